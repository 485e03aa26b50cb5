"""FOAM on a transformers tensor-parallel model (``tp_plan="auto"``) in a plain loop, launched with torchrun.

    torchrun --nproc_per_node=2 examples/tensor_parallel_torchrun.py                  # tiny Llama, CPU, ~30 s
    torchrun --nproc_per_node=2 examples/tensor_parallel_torchrun.py --short          # test-sized, seconds
    torchrun --nproc_per_node=8 examples/tensor_parallel_torchrun.py --model-name-or-path path/to/model \\
        --max-steps 500 --block-size 4 --seq-len 1024 --batch-size 4

transformers splits the model over the ranks as its ``tp_plan`` says (``DistributedConfig(tp_plan="auto")``):
q/k/v, gate and up projections by rows, o_proj and down_proj by columns (the dimension FOAM folds), the
embedding by vocabulary. FOAM is built with the param groups ``optim="foam"`` would use
(``foam_hf.foam_param_groups``) and steps each rank's piece; a column split whose pieces would cut a block is
refused when FOAM is built, naming the weight and the fix (``docs/scale-out.md``). All ranks see the same batch
(tensor parallelism splits the model, not the data): ``--batch-size`` blocks of the Python standard library's
``.py`` sources per step. Without ``--model-name-or-path``, rank 0 writes a tiny Llama to a temporary folder
that every rank loads. Rank 0 prints the loss; every rank then prints the global and local shapes of the first
o_proj weight's folded moment. Returns the losses and those shapes.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import (  # noqa: E402
    block_dataset,
    foam_param_groups,
    leave_without_finalization,
    load_model_and_tokenizer,
    moment_shapes,
    say,
    stdlib_texts,
    torchrun_args,
)

from foam_hf import FOAM  # noqa: E402


def model_folder(args, rank: int) -> tuple[str, bool]:
    """The folder every rank loads the model from, and whether it is a temporary one to delete afterwards."""
    if args.model_name_or_path:
        return args.model_name_or_path, False
    folder = [None]
    if rank == 0:
        model, tokenizer = load_model_and_tokenizer(args)
        folder[0] = tempfile.mkdtemp(prefix="foam-tp-")
        model.save_pretrained(folder[0])
        tokenizer.save_pretrained(folder[0])
    dist.broadcast_object_list(folder, src=0)
    return folder[0], True


def main(argv: list[str] | None = None) -> dict:
    args = torchrun_args(__doc__, "tensor_parallel_torchrun.py", argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    folder, temporary = model_folder(args, rank)
    # Each rank loads only its pieces of the weights (on its GPU under CUDA).
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dist.barrier()  # every rank has read the folder
    if temporary and rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = FOAM(foam_param_groups(model, args, weight_decay=0.1), lr=args.learning_rate)

    rows = block_dataset(
        tokenizer, stdlib_texts(max_files=12 if args.short else 200), args.seq_len, args.max_steps * args.batch_size
    )["input_ids"]
    ids = torch.tensor(rows)
    device = next(model.parameters()).device
    losses = []
    for step in range(args.max_steps):
        # The same blocks on every rank; reused in order when the text runs out.
        input_ids = ids[[(step * args.batch_size + i) % len(ids) for i in range(args.batch_size)]].to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if rank == 0 and (step % max(1, args.max_steps // 10) == 0 or step == args.max_steps - 1):
            say(f"step {step} loss {losses[-1]:.4f}")
    dist.barrier()

    # One column-split weight: its folded moment's global shape, and the piece this rank holds.
    param = next(p for p in model.parameters() if names[id(p)].endswith("o_proj.weight"))
    shapes = moment_shapes(names[id(param)], param, optimizer.state[param]["exp_avg"])
    shapes["placements"] = [repr(p) for p in getattr(param, "placements", ())]
    say(
        f"rank {rank}: {shapes['name']} {shapes['param']} {shapes['placements']}: exp_avg global "
        f"{shapes['exp_avg']}, local {shapes['exp_avg_local']}"
    )
    dist.destroy_process_group()
    return dict(rank=rank, world_size=world, losses=losses, **shapes)


if __name__ == "__main__":
    main()
    leave_without_finalization()
