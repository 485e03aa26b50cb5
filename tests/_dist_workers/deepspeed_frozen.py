"""One rank of a hand-built ``ZeroFOAM`` under DeepSpeed ZeRO with a frozen weight (partial fine-tuning, a PEFT
base), next to one-process FOAM on the same gradients.

Launched by tests/test_deepspeed_zero.py (pytest never collects it: no ``test_`` prefix):

    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_frozen.py --stage 1 --out DIR \
        [--frozen layer]

Every rank sees the same batch, so the averaged gradient is one process's. Rank 0 writes ``DIR/result.pt``: the
weights after three steps under ZeRO and those of the one-process reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 ranks share 2 cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hf_fixtures


def build(frozen: str) -> torch.nn.Sequential:
    """``frozen="weight"``: the first weight frozen (it folds if trained: under ZeRO 1/2 it once left a group of its
    own empty). ``"layer"``: the whole first layer frozen and the trained layer without bias, so ZeroFOAM's shared
    group of unfolded tensors holds only frozen ones (once left empty too)."""
    torch.manual_seed(0)
    bias = frozen != "layer"
    model = torch.nn.Sequential(torch.nn.Linear(16, 18), torch.nn.Tanh(), torch.nn.Linear(18, 5, bias=bias))
    frozen_parameters = [model[0].weight] if frozen == "weight" else list(model[0].parameters())
    for p in frozen_parameters:
        p.requires_grad_(False)
    return model


def main() -> None:
    import deepspeed

    from foam_hf import FOAM
    from foam_hf.zero import ZeroFOAM

    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--frozen", choices=["weight", "layer"], default="weight")
    args = parser.parse_args()
    options = dict(lr=1e-2, weight_decay=0.1, block_size=4)
    model, reference = build(args.frozen), build(args.frozen)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=ZeroFOAM(model.parameters(), **options),
        config={
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": args.stage},
            "zero_allow_untested_optimizer": True,
        },
    )
    plain = FOAM([p for p in reference.parameters() if p.requires_grad], **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 16, generator=gen)
        engine.backward(engine(x).square().mean())
        engine.step()
        reference(x).square().mean().backward()
        plain.step()
        plain.zero_grad()
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"zero": copy.deepcopy(model.state_dict()), "reference": reference.state_dict()}
        torch.save(result, Path(args.out) / "result.pt")
    from hf_fixtures import end_rank

    end_rank()  # not a plain return: gloo's threads can abort a rank at exit (hf_fixtures.end_rank)


if __name__ == "__main__":
    main()
