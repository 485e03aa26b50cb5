"""One rank of a hand-built ``ZeroFOAM`` under DeepSpeed ZeRO with a frozen weight (partial fine-tuning, a PEFT
base), next to one-process FOAM on the same gradients.

Launched by tests/test_deepspeed_zero.py (pytest never collects it: no ``test_`` prefix):

    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_frozen.py --stage 1 --out DIR

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


def build() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 18), torch.nn.Tanh(), torch.nn.Linear(18, 5))
    model[0].weight.requires_grad_(False)  # folds if trained: under ZeRO 1/2 it once left a group empty
    return model


def main() -> None:
    import deepspeed

    from foam_hf import FOAM
    from foam_hf.zero import ZeroFOAM

    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    options = dict(lr=1e-2, weight_decay=0.1, block_size=4)
    model, reference = build(), build()
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
