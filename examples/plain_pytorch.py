"""FOAM in a plain PyTorch loop: a small MLP regression, AdamW and FOAM side by side.

    python examples/plain_pytorch.py --steps 300 --block-size 4

Prints the final loss and the optimizer-state bytes of both. Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch

from foam_hf import FOAM, state_memory


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))


def train(optimizer_name: str, steps: int, block_size: int, seed: int = 0) -> tuple[float, int]:
    model = make_model(seed)
    if optimizer_name == "foam":
        optimizer = FOAM(model.parameters(), lr=3e-3, weight_decay=0.01, block_size=block_size)
        state_bytes = state_memory(optimizer).foam_bytes
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        state_bytes = state_memory(FOAM(model.parameters(), block_size=block_size)).adamw_bytes
    gen = torch.Generator().manual_seed(1234)
    teacher = torch.randn(64, generator=gen)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = torch.randn(128, 64, generator=gen)
        y = torch.sin(x @ teacher / 8).unsqueeze(-1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item(), state_bytes


def main(argv: list[str] | None = None) -> dict[str, tuple[float, int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block-size", type=int, default=4)
    args = parser.parse_args(argv)
    results = {name: train(name, args.steps, args.block_size) for name in ("adamw", "foam")}
    print(f"{'optimizer':<10} {'final loss':>12} {'state bytes':>12}")
    for name, (loss, state_bytes) in results.items():
        print(f"{name:<10} {loss:>12.5f} {state_bytes:>12,}")
    return results


if __name__ == "__main__":
    main()
