"""FOAM under ``torch.compile``: a compiled model trains as the eager one does, in Trainer and in a plain loop,
and a compiled ``optimizer.step`` steps as the eager one does.

Compiling is slow on a small CPU machine (Inductor builds C++ for every graph), so the models are tiny and the
runs 3 steps (enough for the bias corrections and a non-zero moment history to enter the update). Compiled
kernels fuse and reorder floating-point operations, so compiled runs are held to the eager ones within a
tolerance, not bitwise: 1e-5 on weights after 3 steps of lr 1e-3 to 1e-2 (seen: 1e-7), far below what a lost
step or a wrong update would change (O(lr)).
"""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import lm_dataset, tiny_llama, training_args, unwrap_foam
from transformers import Trainer

import foam_hf  # noqa: F401  (registers optim="foam")
from foam_hf import FOAM

pytestmark = pytest.mark.slow
STEPS = 3
ATOL = 1e-5


def train_with_trainer(tmp_path, torch_compile: bool):
    args = training_args(
        tmp_path / f"compile-{torch_compile}",
        max_steps=STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        torch_compile=torch_compile,
        # Trainer's part is the wrapping (the compiled module is what trains, FOAM is built on its parameters);
        # Dynamo and AOTAutograd trace forward and backward as with Inductor, which the plain-loop tests below
        # run. aot_eager skips Inductor's C++ builds: 20 s here instead of 3 minutes on 2 loaded cores.
        torch_compile_backend="aot_eager" if torch_compile else None,
    )
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_trainer_torch_compile_trains_like_eager(tmp_path):
    _, eager_losses, eager = train_with_trainer(tmp_path, torch_compile=False)
    trainer, losses, compiled = train_with_trainer(tmp_path, torch_compile=True)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # it really compiled
    assert type(unwrap_foam(trainer.optimizer)) is FOAM
    assert len(losses) == STEPS and losses == pytest.approx(eager_losses, abs=1e-4)
    assert compiled.keys() == eager.keys()
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, atol=ATOL, rtol=0, msg=name)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def train_loop(model, optimizer, step=None):
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        (step or optimizer.step)()


def assert_same_weights(got: torch.nn.Module, want: torch.nn.Module, atol: float) -> None:
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


def test_compiled_model_in_a_plain_loop_trains_like_eager():
    eager = mlp()
    train_loop(eager, FOAM(eager.parameters(), lr=1e-2, block_size=4))
    model = mlp()
    compiled = torch.compile(model)
    optimizer = FOAM(compiled.parameters(), lr=1e-2, block_size=4)
    train_loop(compiled, optimizer)
    assert optimizer.state[model[0].weight]["exp_avg"].shape == (32, 4)  # folded, as in eager
    assert_same_weights(model, eager, ATOL)


@pytest.mark.parametrize(
    "path, atol",
    [
        # the default CPU path: Dynamo cannot trace the C++ kernel (a pybind function), so it graph-breaks there
        # and the kernel runs as in eager mode: bit for bit the eager result
        (dict(), 0.0),
        (dict(state_dtype="bfloat16"), 0.0),
        # the Python paths are traced and compiled by Inductor (fused, reordered: not bitwise)
        (dict(foreach=False, fused=False), ATOL),
        (dict(foreach=True, fused=False), ATOL),
    ],
    ids=["fused", "fused-bf16-states", "for-loop", "foreach"],
)
def test_compiled_optimizer_step_steps_like_eager(path, atol):
    eager = mlp()
    train_loop(eager, FOAM(eager.parameters(), lr=1e-2, block_size=4, **path))
    model = mlp()
    optimizer = FOAM(model.parameters(), lr=1e-2, block_size=4, **path)
    train_loop(model, optimizer, step=torch.compile(optimizer.step))
    assert [s["step"].item() for s in optimizer.state.values()] == [float(STEPS)] * 4
    assert_same_weights(model, eager, atol)
