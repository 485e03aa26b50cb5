"""FOAM under FSDP2 (``fully_shard``) in a plain loop, launched with torchrun; CPU (gloo) or GPUs (nccl).

    torchrun --nproc_per_node=2 examples/fsdp2_torchrun.py                  # tiny Llama, CPU, under a minute
    torchrun --nproc_per_node=2 examples/fsdp2_torchrun.py --short          # test-sized, seconds
    torchrun --nproc_per_node=8 examples/fsdp2_torchrun.py --model-name-or-path path/to/model \\
        --max-steps 500 --block-size 8 --seq-len 1024 --batch-size 4

Each decoder layer (the classes the model lists in ``_no_split_modules``) is sharded with ``fully_shard``,
then the whole model; FOAM is built on the sharded parameters as on any others, with the param groups
``optim="foam"`` would use (``foam_hf.foam_param_groups``: linear layers fold, embeddings and head do not).
Parameters, gradients and FOAM's moments are DTensors sharded along dim 0, so each rank keeps the folded
moments of its own rows. Every rank trains on its own ``--batch-size`` blocks of the Python standard library's
``.py`` sources per step. Rank 0 prints the loss (averaged over ranks); every rank then prints the global and
local shapes of one folded moment (or that no tensor folds, as with ``--block-size 1``). Returns the losses and
those shapes (``None`` when nothing folds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import (  # noqa: E402
    block_dataset,
    foam_optim_args,
    foam_param_groups,
    leave_without_finalization,
    load_model_and_tokenizer,
    moment_shapes,
    say,
    stdlib_texts,
    torchrun_args,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from foam_hf import FOAM, FoamConfig  # noqa: E402


def shard(model: torch.nn.Module, device: torch.device) -> None:
    """``fully_shard`` every decoder layer, then the model (the rest: embeddings, final norm, output head).

    Each layer's parameters move to ``device`` as they are sharded, so a GPU never holds the whole model.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def folded_moment(optimizer: FOAM) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first parameter FOAM folds and its ``exp_avg``, or ``None`` when nothing folds (``--block-size 1``)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            exp_avg = optimizer.state.get(p, {}).get("exp_avg")
            if exp_avg is not None and p.dim() >= 2 and exp_avg.shape != p.shape:
                return p, exp_avg
    return None


def main(argv: list[str] | None = None) -> dict:
    args = torchrun_args(__doc__, "fsdp2_torchrun.py", argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model, tokenizer = load_model_and_tokenizer(args)  # the same seed (or checkpoint) on every rank
    shard(model, device)
    names = {id(p): n for n, p in model.named_parameters()}
    # What optim="foam" folds (linear layers, not embeddings or head), found by module name on the sharded model.
    optimizer = FOAM(foam_param_groups(model, args, weight_decay=0.1), lr=args.learning_rate)

    rows = block_dataset(
        tokenizer,
        stdlib_texts(max_files=12 if args.short else 200),
        args.seq_len,
        args.max_steps * args.batch_size * world,
    )["input_ids"]
    ids = torch.tensor(rows)
    losses = []
    for step in range(args.max_steps):
        # This rank's share of the step's global batch; the blocks are reused in order when the text runs out.
        start = (step * world + rank) * args.batch_size
        input_ids = ids[[(start + i) % len(ids) for i in range(args.batch_size)]].to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world)
        if rank == 0 and (step % max(1, args.max_steps // 10) == 0 or step == args.max_steps - 1):
            say(f"step {step} loss {losses[-1]:.4f}")
    dist.barrier()

    # One folded moment: its global shape is the parameter's, last dimension folded; its local rows are this rank's.
    found = folded_moment(optimizer)
    if found is None:
        shapes = dict(name=None, param=None, exp_avg=None, exp_avg_local=None)
        block_size = FoamConfig.from_optim_args(foam_optim_args(args)).block_size
        say(
            f"rank {rank}: no tensor folds at block size {block_size}: every moment is AdamW-sized "
            "(FOAM folds tensors of two or more dimensions when the block size is above 1)"
        )
    else:
        param, state = found
        shapes = moment_shapes(names[id(param)], param, state)
        say(
            f"rank {rank}: {shapes['name']} {shapes['param']}: exp_avg global {shapes['exp_avg']}, "
            f"local {shapes['exp_avg_local']}"
        )
    dist.destroy_process_group()
    return dict(rank=rank, world_size=world, losses=losses, **shapes)


if __name__ == "__main__":
    main()
    leave_without_finalization()
