"""FOAM under FSDP2, launched with torchrun; runs on CPU (gloo) or GPUs (nccl).

torchrun --nproc_per_node=2 examples/fsdp2_torchrun.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from foam_hf import FOAM


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = FOAM(model.parameters(), lr=1e-2, block_size=8)
    gen = torch.Generator().manual_seed(rank)
    for step in range(20):
        x = torch.randn(16, 64, generator=gen).to(device)
        loss = (model(x) - x[:, :8]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    state = opt.state[model[0].weight]["exp_avg"]
    print(
        f"rank {rank}: exp_avg of the (128, 64) weight: global {tuple(state.shape)}, "
        f"local {tuple(state.to_local().shape)}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
