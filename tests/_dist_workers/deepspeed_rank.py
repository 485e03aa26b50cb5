"""One rank of a DeepSpeed run with FOAM on CPU (DeepSpeed's CPU accelerator, gloo).

Launched by tests/test_deepspeed_runtime.py (pytest never collects it: no ``test_`` prefix):

    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_rank.py engine --out DIR
    torchrun --standalone --nproc_per_node=1 tests/_dist_workers/deepspeed_rank.py trainer --out DIR

``engine``: ``deepspeed.initialize`` with FOAM as the client optimizer, first under ZeRO stage 0 (trained on
half of each global batch per rank), then under ZeRO stage 2 with plain FOAM (only to record what ZeRO hands
the optimizer: the reason foam_hf.zero.ZeroFOAM exists). ``trainer``: ``transformers.Trainer`` with
``optim="foam"`` and a ZeRO stage 0 DeepSpeed config. Rank 0 writes ``DIR/result.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hf_fixtures

torch.set_num_threads(1)  # ranks share 2 cores

STEPS = 5
GLOBAL_BATCH = 8
FOAM_KWARGS = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, block_size=4)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 10, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen))
        for _ in range(STEPS)
    ]


def engine(stage: int, rank: int, world: int) -> dict:
    import deepspeed

    from foam_hf import FOAM

    model = make_model()
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,  # the plain FOAM run it is held to does not clip (see GRADIENT_CLIPPING_DEFAULT)
        # ZeRO >= 1 asserts on client optimizers it does not know; stage 2 runs plain FOAM to show what ZeRO hands it.
        "zero_allow_untested_optimizer": stage > 0,
    }
    runner, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=FOAM(model.parameters(), **FOAM_KWARGS), config=config
    )
    foam = optimizer
    while not isinstance(foam, FOAM) and hasattr(foam, "optimizer"):
        foam = foam.optimizer
    half = GLOBAL_BATCH // world
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches():
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
            runner.backward(torch.nn.functional.mse_loss(runner(x), y))
            runner.step()
    return {
        "flat_shard_warnings": [str(w.message) for w in caught if "flat shards" in str(w.message)],
        "client_param_shapes": [tuple(p.shape) for g in foam.param_groups for p in g["params"]],
        "exp_avg_shapes": [tuple(s["exp_avg"].shape) for s in foam.state.values()],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def trainer(out: str) -> dict:
    """One rank of the same Trainer run as tests/_dist_workers/trainer_fsdp2.py, under DeepSpeed ZeRO stage 0."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_fixtures import TokenRows, rank_training_args, unwrap_foam
    from trainer_fsdp2 import tiny_llama
    from transformers import Trainer

    import foam_hf  # noqa: F401  (registers optim="foam")

    config = {
        "zero_optimization": {"stage": 0},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    args = rank_training_args(os.path.join(out, "run"), use_cpu=False, deepspeed=config)
    run = Trainer(model=tiny_llama(), args=args, train_dataset=TokenRows())
    run.train()
    foam = unwrap_foam(run.optimizer)
    named = list(run.model.named_parameters())
    return {
        "distributed_type": run.accelerator.distributed_type.value,
        "is_deepspeed_enabled": run.is_deepspeed_enabled,
        "optimizer": type(foam).__name__,
        "params": {n: p.detach().clone() for n, p in named},
        "exp_avg": {n: foam.state[p]["exp_avg"].clone() for n, p in named},
        "losses": [e["loss"] for e in run.state.log_history if "loss" in e],
    }


def main() -> None:
    from hf_fixtures import end_rank

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["engine", "trainer"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.mode == "engine":
        result = {"stage0": engine(0, rank, world), "stage2": engine(2, rank, world)}
    else:
        result = trainer(args.out)
    if rank == 0:
        torch.save(result, os.path.join(args.out, "result.pt"))
    end_rank()  # not a plain return: see hf_fixtures.end_rank


if __name__ == "__main__":
    main()
