"""The one place the test suite keeps what several test modules share.

* Tables (optax's ``_OPTIMIZERS_UNDER_TEST`` and torch's OptimizerInfo database are the model): ``SHAPES``,
  ``HPARAMS``, the implementation ``PATHS`` (readable for-loop, foreach, fused) and the ``CPU_ISAS`` of the
  fused kernel; and the catalogue of bad inputs with the errors they must raise (run by tests/test_errors.py).
* Helpers over them: ``make_params``, ``grad_sequence``, ``run``, ``clone_params``.
* foam_hf's private modules and functions (``_fused_cpu``, ``_single_tensor_foam``, ``_store_moment``, ...).
  They are imported here and nowhere else in the tests, so a move inside the library changes this file only.
* Launching multi-process runs (torchrun, ``accelerate launch``) of the workers in tests/_dist_workers.
* Expectations the tests work out for themselves from a model's module names and parameter shapes.

What builds a Hugging Face run (tokenizer, tiny Llama, datasets, ``TrainingArguments``, the ``StopAt``
callback) lives in tests/hf_fixtures.py; pytest fixtures over these tables (the fused kernel, one ISA at a
time) live in tests/conftest.py.

The expectations call none of foam_hf's resolver, grouping or memory functions (``foam_hf.param_groups``,
``foam_hf.memory``): those are what the tests check. The rules are written out from the documentation
(docs/integration.md, ``foam_hf.param_groups``): under ``optim="foam"`` the ``weight`` of every
``nn.Linear`` folds with the default block size, except the output heads and PEFT adapter layers; every
other trainable parameter keeps AdamW states; a one-dimensional parameter never folds. Weight decay skips
biases and norm weights, as ``Trainer`` does.
"""

from __future__ import annotations

import functools
import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from foam_hf import FOAM, FoamConfig, FoamConfigError, LayerwiseFOAM, _chunking, _fused_cpu, foam_param_groups
from foam_hf import functional as _functional_module
from foam_hf.functional import _multi_tensor_foam, _single_tensor_foam
from foam_hf.precision import store_moment as _store_moment
from foam_hf.zero_layout import _shape_of

__all__ = [  # the private names, re-exported for the test modules (``_fused_triton`` on first use: see below)
    "_chunking",
    "_fused_cpu",
    "_multi_tensor_foam",
    "_shape_of",
    "_single_tensor_foam",
    "_store_moment",
]


def __getattr__(name: str):
    # ``foam_hf._fused_triton`` imports Triton, which must not happen before tests/conftest.py has set
    # TRITON_INTERPRET, nor in the worker processes that never need it: imported on first use only.
    if name == "_fused_triton":
        from foam_hf import _fused_triton

        return _fused_triton
    raise AttributeError(name)


# ============================================================================ shapes and hyper-parameters

#: Parameter shapes under test. Awkward on purpose (R9 of the style notes); each entry says why it exists.
SHAPES = {
    # Divisible (8 at B=2, 4), ragged (n = kB + 1), n < B, a single column, 1-D (never folded) and 3-D.
    "awkward": [(6, 8), (5, 9), (3, 2), (4, 1), (7,), (2, 3, 10)],
    # The same, plus a 0-d scalar and an empty tensor (the foreach path's batching must cope with both).
    "with_empty": [(6, 8), (5, 9), (3, 2), (4, 1), (7,), (2, 3, 10), (), (0, 5)],
    # For the fused CPU kernel: widths that give the SIMD paths whole vectors (16 and 8 lanes) and a tail
    # (100 = 6 * 16 + 4, 81 = 5 * 16 + 1), ragged n = kB + 1 for several B, n < B, a single column, 3-D, and a
    # 1-D tensor long enough for the vectorised AdamW loop plus its tail.
    "simd": [(6, 32), (5, 33), (3, 2), (4, 1), (7,), (2, 3, 10), (9, 257), (3, 100), (2, 81), (37,)],
}

# lr 1e-2 so a few steps move the weights visibly; beta2 = 0.99, low enough that the second moment changes
# within the few steps the tests run.
_ADAM = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)

#: Hyper-parameter sets, by what they exercise. A test takes the entry it needs; FOAM's defaults fill the rest.
HPARAMS = {
    # Adam's terms only: for tests that set weight_decay themselves (AdamW parity at 0 and 0.1).
    "adam": dict(_ADAM),
    # Decoupled weight decay on: the no-decay/decay split and the decay term of every path matter.
    "decay": dict(_ADAM, weight_decay=0.1),
    # Every term of the update a fast path implements besides the residual: scale != 1 and weight decay.
    "scaled": dict(_ADAM, weight_decay=0.05, scale=1.7),
    # Every term, with a residual weight that is neither 0 nor 1.
    "every_term": dict(_ADAM, weight_decay=0.05, scale=1.7, res_scale=0.7),
}

#: ``FOAM``'s documented defaults for the options ``HPARAMS`` leaves out (the reference takes them explicitly).
FOAM_DEFAULTS = dict(weight_decay=0.0, block_size=4, scale=1.0, res_scale=1.0, second_moment="mean_sq")


def reference_kwargs(*hparams: dict) -> dict:
    """The full option set FOAM runs with, for ``foam_hf.reference.FoamReference``: defaults, then ``hparams``."""
    full = dict(FOAM_DEFAULTS)
    for entry in hparams:
        full.update(entry)
    return full


# ============================================================================ parameters, gradients, steps


def make_params(shapes=SHAPES["awkward"], dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    """Leaf tensors of ``shapes``, standard normal. Drawn in float64 and cast, so every dtype sees the same
    numbers (rounded), whichever dtype a test asks for."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def grad_sequence(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients, one per parameter, drawn in float64 and cast to each parameter's dtype."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params] for _ in range(steps)
    ]


def run(optimizer, params, grads) -> None:
    """One ``optimizer.step()`` per entry of ``grads`` (from ``grad_sequence``), each gradient a fresh copy."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def fused_step_results(params, grads, **options) -> list[torch.Tensor]:
    """The weight, ``exp_avg`` and ``exp_avg_sq`` of each parameter, in turn, after ``FOAM(fused=True, **options)``
    over copies of ``params`` has stepped through ``grads`` (from ``grad_sequence``): the fused kernel's output."""
    ours = clone_params(params)
    optimizer = FOAM(ours, fused=True, **options)
    run(optimizer, ours, grads)
    return [t for p in ours for t in (p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])]


def saved_and_loaded(state_dict: dict) -> dict:
    """``state_dict`` after ``torch.save`` and ``torch.load(weights_only=True)``, what Trainer's safe loading does."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def all_params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def assert_same_state(a, b) -> None:
    """The two optimizers hold bit-identical parameters and states (same keys, dtypes and values)."""
    for p, q in zip(all_params(a), all_params(b), strict=True):
        assert torch.equal(p, q)
        assert a.state[p].keys() == b.state[q].keys()
        for key in a.state[p]:
            assert a.state[p][key].dtype == b.state[q][key].dtype
            assert torch.equal(a.state[p][key], b.state[q][key]), key


def peak_transient_bytes(step) -> int:
    """Peak of allocated-minus-freed bytes through torch's CPU allocator during ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def clone_params(params) -> list[torch.Tensor]:
    """Fresh leaf copies with the same values: the twin a test steps alongside."""
    return [p.detach().clone().requires_grad_() for p in params]


def stochastically_rounded(values: torch.Tensor, step: int, salt: int = 2) -> torch.Tensor:
    """bf16 ``values`` (fp32), entry i rounded by the dither ``h(i, step, salt) & 0xFFFF``: h = i·0x9E3779B1 +
    step·0x85EBCA77 + salt·0xC2B2AE3D (mod 2^32), then h ^= h >> 16, h *= 0x7FEB352D, h ^= h >> 15; a finite
    value's bits get the dither added and lose their low 16 bits (non-finite ones do not occur here)."""
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    mask = 0xFFFFFFFF
    index = torch.arange(values.numel(), dtype=torch.int64)
    h = (index * 0x9E3779B1 + step * 0x85EBCA77 + salt * 0xC2B2AE3D) & mask
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & mask
    h = h ^ (h >> 15)
    bits = values.contiguous().view(-1).view(torch.int32).to(torch.int64) & mask
    rounded = (bits + (h & 0xFFFF)) & 0xFFFF0000  # a carry past the top bit is dropped, as in 32-bit lanes
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)  # the same 32 bits
    return rounded.view(torch.float32).view(values.shape).to(torch.bfloat16)  # exact: the low half is zero


# ============================================================================ implementation paths

# The implementations a group can run on: ``_single_tensor_foam`` (the readable reference path), the foreach
# path (``_multi_tensor_foam``) and the fused C++ kernel (``_fused_cpu``); ``default`` lets FOAM choose.
FOR_LOOP = dict(foreach=False, fused=False)
FOREACH = dict(foreach=True, fused=False)
FUSED = dict(fused=True)
PATHS = {"for-loop": FOR_LOOP, "foreach": FOREACH, "fused": FUSED, "default": {}}

#: The fused CPU kernel's implementations; tests run each one this CPU can run and skip the others.
CPU_ISAS = ("portable", "avx2", "avx512")

#: Where each of FOAM's step functions lives, as ``(module, attribute)``: patch there to see which one runs.
STEP_FUNCTIONS = {
    "_fused_foam": (_fused_cpu, "_fused_foam"),
    "_multi_tensor_foam": (_functional_module, "_multi_tensor_foam"),
    "_single_tensor_foam": (_functional_module, "_single_tensor_foam"),
}


@functools.cache
def fused_kernel_builds() -> bool:
    """Whether the fused CPU kernel is available here (it needs a C++ compiler). tests/test_fused.py fails
    loudly when a compiler is present and the kernel does not build."""
    return _fused_cpu.load_kernel() is not None


def path_names(*names: str) -> list[str]:
    """``names`` (keys of ``PATHS``) without ``"fused"`` where the kernel is unavailable: parametrize over these."""
    return [n for n in names if n != "fused" or fused_kernel_builds()]


# ============================================================================ multi-process runs

REPO = Path(__file__).resolve().parents[1]
DIST_WORKERS = REPO / "tests" / "_dist_workers"
# Float32 gradients reduced in another order differ in the last bits, and FOAM's division by sqrt(V) can
# amplify them where V is tiny; 2e-4 is far above that (1e-7 seen here) and far below a wrong fold or a lost
# half batch (O(lr) = O(1e-2) per step).
DIST_TOLERANCE = 2e-4
LAUNCH_TIMEOUT = 480  # seconds per launch: 10-25 s on 2 idle cores, several times that when they are shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The environment of a launched worker: one thread per rank, this checkout importable, and nothing of
    accelerate's or FSDP's configuration leaking in from the calling shell."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    for key in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        del env[key]
    return env


def stale_extension_locks() -> list[str]:
    """Lock files of torch extension builds (DeepSpeed's ``deepspeed_shm_comm``, ...) older than a build takes.

    torch's build lock is a file that a killed build (SIGKILL, a timeout) leaves behind, and every later build of
    that extension waits on it forever: a launched worker that builds one would hang the test until its timeout.
    FOAM's own kernel removes a stale lock of its own (``_fused_cpu.STALE_LOCK_SECONDS``); this lists the others.
    """
    ours = _fused_cpu.extension_name().rsplit("_", 1)[0]  # foam_hf_fused_cpu_<digest>, less the digest
    root = Path(_fused_cpu.build_directory(ours)).parent
    now = time.time()
    stale = []
    for lock in sorted(root.glob("*/lock")):
        if lock.parent.name.startswith(ours):
            continue
        try:
            if now - lock.stat().st_mtime > _fused_cpu.STALE_LOCK_SECONDS:
                stale.append(str(lock))
        except FileNotFoundError:  # its build just finished
            pass
    return stale


def _process_tree(root: int) -> list[int]:
    """``root`` and every process below it, read from /proc (Linux); ``[root]`` where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        except (OSError, IndexError):  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def run_process_tree(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, but a timeout ends every process ``cmd``
    started, and fails the test saying so.

    ``subprocess.run`` kills only the process it started: torchrun's and accelerate's workers run on after it
    (torchrun starts each in a session of its own), holding cores and ports while the next tests run. On timeout
    this kills the whole tree, found through the parent of every process. A stale extension build lock (see
    :func:`stale_extension_locks`), which would make the run hang until the timeout, fails the test before it starts.
    """
    stale = stale_extension_locks()
    assert not stale, (
        f"{len(stale)} torch extension build lock(s) older than {_fused_cpu.STALE_LOCK_SECONDS:.0f} s: "
        f"{', '.join(stale)}. A killed build left them, and every later build of that extension waits on them "
        "forever. Fix: delete them (rm), then rerun."
    )
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in _process_tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stdout, stderr = proc.communicate(timeout=60)  # a process left holding the pipes: no hang
            raise AssertionError(
                f"{' '.join(map(str, cmd))} ran past its {timeout:.0f} s and was killed with every process it "
                f"started.\n{stdout[-3000:]}\n{stderr[-6000:]}"
            ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def launch(launcher: list[str], out: Path, *worker_args: str, worker: str) -> dict:
    """Run ``worker`` under ``launcher`` (empty: 1 plain process) and return what rank 0 saved."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*(launcher or [sys.executable]), worker, *worker_args, "--out", str(out)]
    proc = run_process_tree(cmd, env=worker_env(), cwd=out, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / "result.pt", weights_only=False)


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def accelerate_launch(config_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--main_process_port",
        str(free_port()),
    ]


# ============================================================================ expectations from module names

#: ``FoamConfig``'s documented default block size.
DEFAULT_BLOCK_SIZE = 4

#: Output heads of the models these tests build: a causal-LM head and a reward/sequence-classification head.
OUTPUT_HEADS = ("lm_head", "score")

_STEP_BYTES = 4  # state["step"]: a float32 scalar per parameter, as in torch.optim.AdamW


def _is_adapter(name: str) -> bool:
    """PEFT LoRA adapter weights live under ``...<layer>.lora_A.<adapter>`` / ``lora_B``."""
    return any(part.startswith("lora_") for part in name.split("."))


def expected_block_sizes(
    model: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE, overrides: dict[str, int] | None = None
) -> dict[str, int]:
    """Trainable parameter name -> block size under ``optim="foam"``.

    ``overrides`` maps a module name component (``"lm_head"``, ``"lora_A"``) to a block size for every
    trainable parameter below a module of that name, as ``block_sizes=lm_head:2`` does.
    """
    folded = {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module_name.rsplit(".", 1)[-1] not in OUTPUT_HEADS
        and not _is_adapter(module_name)
    }
    sizes = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        size = block_size if name in folded else 1
        for component, override in (overrides or {}).items():
            if component in name.split(".")[:-1]:
                size = override
        sizes[name] = size
    return sizes


def expected_moment_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """``(*rows, ceil(n / B))`` for a parameter of two or more dimensions and ``B > 1``, else the shape itself."""
    if block_size > 1 and len(shape) >= 2:
        return (*shape[:-1], math.ceil(shape[-1] / block_size))
    return tuple(shape)


def state_itemsize(param: torch.Tensor) -> int:
    """Bytes per moment entry: fp32 for half-precision parameters, else the parameter's own dtype."""
    return 4 if param.dtype in (torch.float16, torch.bfloat16) else param.element_size()


def expected_state_bytes(model: nn.Module, block_sizes: dict[str, int]) -> tuple[int, int]:
    """(FOAM, AdamW) optimizer-state bytes: two moments and a 4-byte step per trainable parameter."""
    params = dict(model.named_parameters())
    foam = adamw = 0
    for name, block_size in block_sizes.items():
        p = params[name]
        foam += 2 * math.prod(expected_moment_shape(tuple(p.shape), block_size)) * state_itemsize(p) + _STEP_BYTES
        adamw += 2 * p.numel() * state_itemsize(p) + _STEP_BYTES
    return foam, adamw


def decays(model: nn.Module) -> dict[str, bool]:
    """Trainable parameter name -> whether weight decay applies: not to biases nor to norm layers' weights."""
    norm_modules = {
        module_name for module_name, module in model.named_modules() if type(module).__name__.endswith("Norm")
    }
    result = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module_name, _, leaf = name.rpartition(".")
            result[name] = leaf != "bias" and module_name not in norm_modules
    return result


def hand_built_foam_groups(model: nn.Module, block_sizes: dict[str, int], weight_decay: float) -> list[dict]:
    """Param groups written the way a user would for ``FOAM(...)``: one per (block size, decays?) pair."""
    decay = decays(model)
    params = dict(model.named_parameters())
    groups: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for name, block_size in block_sizes.items():
        groups.setdefault((block_size, decay[name]), []).append(params[name])
    return [
        {"params": ps, "block_size": b, "weight_decay": weight_decay if d else 0.0} for (b, d), ps in groups.items()
    ]


# ============================================================================ the catalogue of bad inputs
# Every bad input is here once, with the error a user reads. Messages are checked on key fragments: the
# offending value, the rule it breaks and the fix (R7/R8 of the style notes). tests/test_errors.py runs the
# tables; the inputs that need a model or a Trainer (overrides, the command line, Trainer set-up) are in
# tests/test_bad_inputs.py beside the behaviours of the awkward inputs that are accepted.

nan, inf = math.nan, math.inf


def leaf(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh random leaf tensor that requires grad."""
    return torch.randn(*shape, dtype=dtype).requires_grad_()


# (id, kwargs of FOAM([leaf(2, 4)], **kwargs), error type, fragments). Every message also carries "Fix:".
FOAM_ERROR_INPUTS = [
    ("lr=-0.001", dict(lr=-1e-3), FoamConfigError, ["lr=-0.001 is invalid: it must be finite and >= 0"]),
    ("lr=nan", dict(lr=nan), FoamConfigError, ["lr=nan is invalid"]),
    ("lr=inf", dict(lr=inf), FoamConfigError, ["lr=inf is invalid"]),
    ("lr=-inf", dict(lr=-inf), FoamConfigError, ["lr=-inf", "finite and >= 0", "Fix:"]),
    ("lr='1e-3'", dict(lr="1e-3"), TypeError, ["lr='1e-3' has type str"]),
    ("lr=None", dict(lr=None), TypeError, ["lr=None", "must be a real number", "Fix: pass e.g. lr=1e-3"]),
    (
        "lr=2-element tensor",
        dict(lr=torch.tensor([1e-3, 2e-3])),
        FoamConfigError,
        ["lr is a tensor of shape (2,)", "a number or a one-element tensor", "Fix:"],
    ),
    ("eps=-1.0", dict(eps=-1.0), FoamConfigError, ["eps=-1.0 is invalid"]),
    ("eps=nan", dict(eps=nan), FoamConfigError, ["eps=nan", "finite and >= 0", "Fix: pass e.g. eps=1e-8"]),
    ("eps=inf", dict(eps=inf), FoamConfigError, ["eps=inf", "finite and >= 0", "Fix:"]),
    ("weight_decay=-0.1", dict(weight_decay=-0.1), FoamConfigError, ["weight_decay=-0.1 is invalid"]),
    ("weight_decay=nan", dict(weight_decay=nan), FoamConfigError, ["weight_decay=nan"]),
    ("weight_decay=inf", dict(weight_decay=inf), FoamConfigError, ["weight_decay=inf", "finite and >= 0", "Fix:"]),
    (
        "betas=(1.0, 0.999)",
        dict(betas=(1.0, 0.999)),
        FoamConfigError,
        ["betas[0]=1.0 is invalid: it must be in [0, 1)"],
    ),
    ("betas=(nan, 0.999)", dict(betas=(nan, 0.999)), FoamConfigError, ["betas[0]=nan", "in [0, 1)", "Fix:"]),
    ("betas=(0.9, -0.1)", dict(betas=(0.9, -0.1)), FoamConfigError, ["betas[1]=-0.1"]),
    ("betas=(0.9, 1.0)", dict(betas=(0.9, 1.0)), FoamConfigError, ["betas[1]=1.0", "in [0, 1)", "Fix:"]),
    ("betas=0.9", dict(betas=0.9), TypeError, ["betas=0.9 must be a pair"]),
    ("betas=(0.9,)", dict(betas=(0.9,)), TypeError, ["betas=(0.9,)", "must be a pair", "Fix: pass betas=(0.9, 0.999)"]),
    ("betas='ab'", dict(betas="ab"), TypeError, ["betas='ab'", "must be a pair", "Fix:"]),
    ("block_size=0", dict(block_size=0), FoamConfigError, ["block_size=0 is invalid: it must be a positive int"]),
    ("block_size=-4", dict(block_size=-4), FoamConfigError, ["block_size=-4"]),
    ("block_size=4.0", dict(block_size=4.0), TypeError, ["block_size=4.0 has type float"]),
    ("block_size=True", dict(block_size=True), TypeError, ["block_size=True has type bool"]),
    ("block_size='4'", dict(block_size="4"), TypeError, ["block_size='4'", "has type str", "Fix: pass block_size=4"]),
    ("block_size=inf", dict(block_size=inf), TypeError, ["block_size=inf", "has type float", "positive int", "Fix:"]),
    ("scale=0.0", dict(scale=0.0), FoamConfigError, ["scale=0.0 is invalid: it must be finite and > 0"]),
    ("scale=-1.0", dict(scale=-1.0), FoamConfigError, ["scale=-1.0"]),
    ("scale=inf", dict(scale=inf), FoamConfigError, ["scale=inf", "finite and > 0", "Fix: pass scale=1.0"]),
    ("scale=nan", dict(scale=nan), FoamConfigError, ["scale=nan", "finite and > 0", "Fix:"]),
    (
        "res_scale=-0.5",
        dict(res_scale=-0.5),
        FoamConfigError,
        ["res_scale=-0.5 is invalid: it must be finite and >= 0"],
    ),
    ("res_scale=nan", dict(res_scale=nan), FoamConfigError, ["res_scale=nan", "finite and >= 0", "Fix:"]),
    ("res_scale=inf", dict(res_scale=inf), FoamConfigError, ["res_scale=inf", "finite and >= 0", "Fix:"]),
    (
        "second_moment='mean'",
        dict(second_moment="mean"),
        FoamConfigError,
        ["second_moment='mean' is invalid: it must be one of"],
    ),
    (
        "second_moment=None",
        dict(second_moment=None),
        FoamConfigError,
        ["second_moment=None", "one of ('mean_sq', 'sq_mean')", "Fix: pass second_moment='mean_sq'"],
    ),
    ("foreach='yes'", dict(foreach="yes"), TypeError, ["foreach='yes'"]),
    ("foreach=1.5", dict(foreach=1.5), TypeError, ["foreach=1.5", "None, True or False", "Fix:"]),
    ("fused='yes'", dict(fused="yes"), TypeError, ["fused='yes'", "None, True or False", "Fix:"]),
    ("fused=True and foreach=True", dict(fused=True, foreach=True), FoamConfigError, ["fused=True and foreach=True"]),
    (
        "state_dtype='float16'",
        dict(state_dtype="float16"),
        FoamConfigError,
        ["state_dtype='float16'", "underflow", "Fix: pass state_dtype='bfloat16'"],
    ),
    ("state_dtype=torch.float16", dict(state_dtype=torch.float16), FoamConfigError, ["torch.float16", "underflow"]),
    ("state_dtype='bf16'", dict(state_dtype="bf16"), FoamConfigError, ["state_dtype='bf16'", "'bfloat16'"]),
]


def _same_parameter_in_two_groups():
    p = leaf(2, 4)
    return FOAM([{"params": [p]}, {"params": [p], "lr": 0.1}])


# (id, builder, error type, fragments): parameter lists and param groups. Rows marked "torch" are raised by
# torch.optim.Optimizer with torch's own words; FOAM keeps torch's contract there (the same inputs fail the
# same way for torch.optim.AdamW). Rows whose id says "fused=True" need the fused kernel: where it cannot be
# built, the same call fails on the build instead (tests/test_errors.py checks that).
PARAM_ERROR_INPUTS = [
    ("torch: empty parameter list", lambda: FOAM([]), ValueError, ["empty parameter list"]),
    (
        "torch: a bare tensor, not an iterable",
        lambda: FOAM(leaf(2, 4)),
        TypeError,
        ["iterable of Tensors", "FloatTensor"],
    ),
    (
        "torch: a string among the params",
        lambda: FOAM([leaf(2, 4), "w"]),
        TypeError,
        ["can only optimize Tensors", "str"],
    ),
    ("torch: a non-leaf tensor", lambda: FOAM([leaf(2, 4) * 2]), ValueError, ["non-leaf Tensor"]),
    ("same parameter in two groups", _same_parameter_in_two_groups, ValueError, ["more than one parameter group"]),
    (
        "a param group that is a list",
        lambda: FOAM([leaf(2, 4)]).add_param_group([leaf(2, 4)]),
        TypeError,
        ["param group must be a dict", "list"],
    ),
    (
        "block_size=0 in group 1 names the group",
        lambda: FOAM([{"params": [leaf(2, 4)]}, {"params": [leaf(2, 4)], "block_size": 0}]),
        FoamConfigError,
        ["block_size=0", "(in param group 1)"],
    ),
    (
        "NaN lr in group 1 names the group",
        lambda: FOAM([{"params": [leaf(2, 4)]}, {"params": [leaf(2, 4)], "lr": nan}]),
        FoamConfigError,
        ["lr=nan", "finite and >= 0", "(in param group 1)"],
    ),
    (
        "misspelled group key 'rho'",
        lambda: FOAM([{"params": [leaf(2, 4)], "rho": 0.5}]),
        FoamConfigError,
        ["['rho']", "not FOAM options", "Valid options", "Fix: 'rho': use res_scale"],
    ),
    (
        "LayerwiseFOAM should_step that is not a function",
        lambda: LayerwiseFOAM([leaf(2, 4)], should_step=True),
        TypeError,
        ["should_step=True must be a function of no arguments", "Fix: pass e.g. should_step=lambda: True"],
    ),
    (  # it failed with a bare TypeError inside the first backward()
        "LayerwiseFOAM should_step that takes an argument",
        lambda: LayerwiseFOAM([leaf(2, 4)], should_step=lambda step: step % 4 == 0),
        TypeError,
        ["cannot be called without arguments (missing a required argument: 'step')", "Fix: a function of no"],
    ),
    (
        "misspelt group key within a typo of an option",
        lambda: FOAM([{"params": [leaf(2, 4)], "block_szie": 8}]),
        FoamConfigError,
        ["['block_szie']", "would be ignored", "Fix: 'block_szie': use 'block_size' (a typo?)"],
    ),
    (
        "block_sizes, the per-module key, as a group option",
        lambda: FOAM([{"params": [leaf(2, 4)], "block_sizes": 8}]),
        FoamConfigError,
        ["['block_sizes']", "a FoamConfig / optim_args key", "a param group takes one block_size"],
    ),
    (
        "state_dtypes for state_dtype",
        lambda: FOAM([{"params": [leaf(2, 4)], "state_dtypes": "bfloat16"}]),
        FoamConfigError,
        ["['state_dtypes']", "use 'state_dtype' (a typo?)"],
    ),
    (
        "FoamConfig key 'level' as a group option",
        lambda: FOAM([{"params": [leaf(2, 4)], "level": 2}]),
        FoamConfigError,
        ["['level'] are not FOAM options"],
    ),
    (
        "torch's maximize=True as a group option (FOAM would descend)",
        lambda: FOAM([{"params": [leaf(2, 4)], "maximize": True, "amsgrad": False}]),
        FoamConfigError,
        ["param group 0 sets {'maximize': True}", "FOAM has no such mode", "Fix: minimize the negated objective"],
    ),
    (
        "torch's amsgrad=True and capturable=True as group options",
        lambda: FOAM([{"params": [leaf(2, 4)]}, {"params": [leaf(2, 4)], "amsgrad": True, "capturable": True}]),
        FoamConfigError,
        ["param group 1 sets {'amsgrad': True, 'capturable': True}", "drop amsgrad", "drop capturable"],
    ),
    (
        "complex parameter",
        lambda: FOAM([leaf(2, 4, dtype=torch.complex64)]),
        TypeError,
        ["complex parameter of shape"],
    ),
    ("integer parameter", lambda: FOAM([torch.zeros(2, 4, dtype=torch.long)]), TypeError, ["dtype torch.int64"]),
    (
        "fused=True on a float64 parameter with bf16 states",
        lambda: FOAM([leaf(2, 4, dtype=torch.float64)], fused=True, state_dtype="bfloat16"),
        FoamConfigError,
        [
            "fused=True in param group 0",
            "torch.float64 parameters and torch.bfloat16 states",
            "keeps the states of float64 parameters in float64",
            "Fix: pass state_dtype=None",
        ],
    ),
    (
        "fused=True on a float64 parameter with fp32 states",
        lambda: FOAM([leaf(2, 4, dtype=torch.float64)], fused=True, state_dtype="float32"),
        FoamConfigError,
        ["fused=True in param group 0", "torch.float64 parameters and torch.float32 states", "Fix:"],
    ),
    (
        "fused=True on a transposed parameter",
        lambda: FOAM([torch.randn(6, 4).t().requires_grad_()], fused=True),
        RuntimeError,
        ["shape (4, 6)", "contiguous=False", "Fix: pass fused=None or False"],
    ),
    (
        "fused=True on a transposed parameter in add_param_group",
        lambda: FOAM([leaf(2, 4)]).add_param_group({"params": [torch.randn(6, 4).t().requires_grad_()], "fused": True}),
        RuntimeError,
        ["fused=True in param group 1", "contiguous=False", "Fix: pass fused=None or False"],
    ),
    (
        "a float8 parameter",
        lambda: FOAM([torch.zeros(2, 4, dtype=torch.float8_e4m3fn).requires_grad_()]),
        TypeError,
        ["dtype torch.float8_e4m3fn", "'float16', 'bfloat16', 'float32', 'float64'", "Fix: optimize a bf16 or fp32"],
    ),
]

# (optim_args string, error type, fragments). Each is refused by ``FoamConfig.from_optim_args`` and, with the
# same message, when ``TrainingArguments(optim="foam", optim_args=...)`` is built (tests/test_errors.py).
OPTIM_ARGS_ERRORS = [
    (123, TypeError, ["optim_args=123", "has type int", "Fix:"]),
    ("block_size=4,block_size=8", FoamConfigError, ["'block_size' is given twice", "block_size=4", "Fix: keep one"]),
    ("=4", FoamConfigError, ["'=4' is not of the form key=value", "Example:"]),
    ("block_size=4=5", FoamConfigError, ["'block_size=4=5' is not of the form key=value", "Example:"]),
    (
        "lr=1e-3",
        FoamConfigError,
        ["unknown key(s) ['lr']", "TrainingArguments' learning_rate", "Valid keys", "block_size:"],
    ),
    (
        "betas=0.9",
        FoamConfigError,
        ["'betas' is not one of FOAM's own keys", "adam_beta1 and adam_beta2", "--adam_beta2"],
    ),
    ("eps=1e-6,blocksize=2", FoamConfigError, ["['blocksize', 'eps']", "'eps'", "adam_epsilon", "Valid keys"]),
    (
        "block_size=4 level=2",
        FoamConfigError,
        ["'block_size=4 level=2' is two entries separated by a space", "Fix: block_size=4,level=2"],
    ),
    (
        r"block_sizes=layers\.\d{1,2}\.q_proj:8",
        FoamConfigError,
        ["holds a regex quantifier {m,n}", "its ',' splits optim_args", r"Fix: write the pattern without a comma"],
    ),
    (  # a YAML mapping joined into k=v text (axolotl's optim_args); the old message suggested "{'q_proj':4"
        "block_size=8,block_sizes={'q_proj': 16, 'lm_head': 1},callback=false",
        FoamConfigError,
        [
            "block_sizes=\"{'q_proj': 16, 'lm_head': 1}\" writes block_sizes as a Python or JSON",  # not ,callback
            "Fix: block_sizes=q_proj:16;lm_head:1",
            'block_sizes: "q_proj:16;lm_head:1"',
        ],
    ),
    (
        'target_modules=["q_proj", "v_proj"]',
        FoamConfigError,
        ["writes target_modules as a Python or JSON list", "Fix: target_modules=q_proj;v_proj"],
    ),
    (  # nested: no respelling to offer, so an example instead of a "Fix:" that would itself be refused
        "block_sizes={'q_proj': {'lora_A': 4}}",
        FoamConfigError,
        ["writes block_sizes as a Python or JSON mapping", "Write it as e.g. block_sizes=q_proj:8;lm_head:1"],
    ),
    (
        "block_sizes=q_proj=8",
        FoamConfigError,
        ["pattern:size (':' before the size, not '=')", "Fix: block_sizes=q_proj:8"],
    ),
    ({"block_size": [4]}, FoamConfigError, ["block_size=[4] has type list", "a string or a number", "Example:"]),
    ({"block_sizes": {"q_proj": "x"}}, FoamConfigError, ["block_sizes['q_proj']='x' is invalid", "an int >= 1"]),
    (
        "block_size=4,blocksize=8",
        FoamConfigError,
        ["unknown key(s) ['blocksize'].\n'blocksize': did you mean 'block_size'?\nValid keys"],
    ),
    ("block_size=", FoamConfigError, ["block_size=''", "is not an integer", "Example: block_size=4"]),
    ("block_size=2.5", FoamConfigError, ["block_size='2.5'", "is not an integer", "Example:"]),
    ("block_size=four", FoamConfigError, ["block_size='four' is not an integer"]),
    ("block_size=0", FoamConfigError, ["block_size=0 is invalid"]),
    ("block_size=4,level=2", FoamConfigError, ["both given"]),
    ("level=20", FoamConfigError, ["level=20", "an int in [0, 16]", "Fix: e.g. level=2"]),
    ("level=-1", FoamConfigError, ["level=-1", "an int in [0, 16]", "Fix:"]),
    ("scale=0", FoamConfigError, ["scale=0.0", "finite and > 0", "Fix:"]),
    ("scale=nan", FoamConfigError, ["scale=nan", "finite and > 0", "Fix: pass scale=1.0", "optim_args"]),
    ("scale=1e400", FoamConfigError, ["scale=inf", "finite and > 0", "Fix:"]),
    ("res_scale=abc", FoamConfigError, ["res_scale='abc'", "is not a number", "Example: res_scale=1.0"]),
    ("second_moment=", FoamConfigError, ["second_moment=''", "one of ('mean_sq', 'sq_mean')", "Fix:"]),
    ("second_moment=mean", FoamConfigError, ["second_moment='mean' is invalid"]),
    ("target_modules=;", FoamConfigError, ["target_modules= is empty", "Fix: e.g. target_modules=q_proj;v_proj"]),
    (
        "target_modules=q_proj:8",
        FoamConfigError,
        ["entry 'q_proj:8' gives a size", "take none", "Fix: block_sizes=q_proj:8", "target_modules=q_proj to fold"],
    ),
    ("target_modules=q_proj;v_proj:16", FoamConfigError, ["'v_proj:16' gives a size", "block_sizes=v_proj:16"]),
    ("block_sizes=q_proj", FoamConfigError, ["entry 'q_proj' is not pattern:size"]),
    ("block_sizes=:4", FoamConfigError, ["':4' is not pattern:size", "Example: block_sizes=q_proj:8"]),
    ("block_sizes=q_proj:abc", FoamConfigError, ["'q_proj:abc'", "size 'abc' is not an int >= 1", "Fix: e.g."]),
    ("block_sizes=q_proj:0", FoamConfigError, ["'q_proj:0': size '0' is not an int >= 1"]),
    ("block_sizes=q_proj:-2", FoamConfigError, ["'q_proj:-2'", "an int >= 1", "Fix: e.g. block_sizes=q_proj:4"]),
    ("block_sizes=q_proj:4;q_proj:8", FoamConfigError, ["'q_proj' is given twice", "q_proj:4", "q_proj:8", "Fix:"]),
    ("block_sizes=q_proj:4,8", FoamConfigError, ["'8' follows block_sizes=", "separated by ';', not ','", "Fix:"]),
    ("block_sizes=q_proj:8,lm_head:1", FoamConfigError, ["'lm_head:1' follows block_sizes=", "separated by ';'"]),
    (
        "target_modules=q_proj,v_proj",
        FoamConfigError,
        ["'v_proj' follows target_modules=", "separated by ';', not ','", "Fix: e.g. target_modules=q_proj;v_proj."],
    ),
    ("block_sizes=q_proj(:4", FoamConfigError, ["'q_proj('", "not a valid regex", "Fix:"]),
    ("block_sizes=q_proj:8:9", FoamConfigError, ["entry 'q_proj:8:9' holds more than one ':'", "Fix: e.g."]),
    ("target_modules=v_proj;q_proj(", FoamConfigError, ["'q_proj('", "not a valid regex", "Fix:"]),
    ("callback=maybe", FoamConfigError, ["callback='maybe'", "not a boolean", "callback=true"]),
    ("alpha=2", FoamConfigError, ["unknown key(s) ['alpha']", "the paper's name: FOAM's key is scale"]),
]

# (id, builder, error type, fragments): the typed config, as Python users write it.
CONFIG_ERRORS = [
    (
        "block_sizes as a string",
        lambda: FoamConfig(block_sizes="q_proj:4"),
        TypeError,
        ["block_sizes='q_proj:4'", "must be a dict", "e.g. {'q_proj': 8"],
    ),
    (
        "empty pattern",
        lambda: FoamConfig(block_sizes={"": 4}),
        FoamConfigError,
        ["pattern ''", "non-empty string", "Fix:"],
    ),
    (
        "float block size in block_sizes",
        lambda: FoamConfig(block_sizes={"q_proj": 4.0}),
        FoamConfigError,
        ["block_sizes['q_proj']=4.0", "an int >= 1", "Fix:"],
    ),
    (
        "empty target_modules list",
        lambda: FoamConfig(target_modules=[]),
        TypeError,
        ["target_modules=[]", "non-empty list", "Fix: e.g. target_modules=['q_proj', 'v_proj']"],
    ),
    (  # one string is one regex over the whole name: it matched nothing, and failed only at train()
        "comma-joined target_modules string",
        lambda: FoamConfig(target_modules="q_proj, v_proj"),
        FoamConfigError,
        ["target_modules='q_proj, v_proj' is one string", "no module name holds a ','", "Fix: a list (['q_proj', "],
    ),
    (  # 'ALL-LINEAR' was a module name that matched nothing, found at train()
        "target_modules ALL-LINEAR",
        lambda: FoamConfig.from_optim_args("target_modules=ALL-LINEAR"),
        FoamConfigError,
        ["target_modules='ALL-LINEAR': did you mean 'all-linear'?"],
    ),
    (
        "optim_args key in upper case",
        lambda: FoamConfig.from_optim_args("BLOCK_SIZE=4"),
        FoamConfigError,
        ["unknown key(s) ['BLOCK_SIZE']", "'BLOCK_SIZE': did you mean 'block_size'? Keys are lower case."],
    ),
    (  # its ',' split the tuple: the message was "'0.99)' is not of the form key=value"
        "betas tuple in optim_args",
        lambda: FoamConfig.from_optim_args("betas=(0.9,0.99)"),
        FoamConfigError,
        ["unknown key(s) ['betas']", "from TrainingArguments' adam_beta1 and adam_beta2", "Fix: set it there"],
    ),
    (
        "foam_param_groups over model.parameters()",
        lambda: foam_param_groups(torch.nn.Linear(4, 4).parameters()),
        TypeError,
        ["model=generator is not an nn.Module", "Fix: pass the model itself"],
    ),
    (
        "target_modules with block_size=1",
        lambda: FoamConfig(target_modules=["q_proj"], block_size=1),
        FoamConfigError,
        ["target_modules=['q_proj'] names the modules that fold with block_size, which is 1", "block_sizes=q_proj:4"],
    ),
    (
        "empty target_modules string",
        lambda: FoamConfig(target_modules=""),
        FoamConfigError,
        ["target_modules='' names no module", "Fix: None for FOAM's default"],
    ),
    ("callback='yes'", lambda: FoamConfig(callback="yes"), TypeError, ["callback='yes'", "True or False", "Fix:"]),
    (
        "target regex the optim_args string cannot carry",
        lambda: FoamConfig(target_modules=r".*layers\.[0-9]{1,2}\.mlp.*").to_optim_args(),
        FoamConfigError,
        ["target_modules pattern", "{1,2}", "contains ','", "cannot carry", "Fix:", "[0-9][0-9]? for [0-9]{1,2}"],
    ),
    (
        "two targets in one list entry",
        lambda: FoamConfig(target_modules=["q_proj;v_proj"]).to_optim_args(),
        FoamConfigError,
        ["target_modules pattern 'q_proj;v_proj' contains ';'", "Fix: give one list entry per name"],
    ),
    (
        "a size in a target list entry",
        lambda: FoamConfig(target_modules=["q_proj:8"]).to_optim_args(),
        FoamConfigError,
        ["target_modules pattern 'q_proj:8' contains ':'", "':' gives a size"],
    ),
    (
        "a space in a target",
        lambda: FoamConfig(target_modules="q_proj|v proj").to_optim_args(),
        FoamConfigError,
        ["'q_proj|v proj' contains ' '", "transformers removes spaces"],
    ),
    (
        "pattern the optim_args string cannot carry",
        lambda: FoamConfig(block_sizes={"a:b": 4}).to_optim_args(),
        FoamConfigError,
        ["'a:b' contains ':'", "':' gives a size", "Fix: rewrite the pattern without them"],
    ),
    (
        "pattern with a space, which transformers removes",
        lambda: FoamConfig(block_sizes={"q proj": 4}).to_optim_args(),
        FoamConfigError,
        ["'q proj' contains ' '", "transformers removes spaces", "Fix: rewrite the pattern without them"],
    ),
]

# (id, TrainingArguments fields besides optim="foam", fragments of the FoamConfigError): the Adam-style fields
# reach FOAM under their own names and are refused, under those names, when the arguments are built.
TRAINING_ARGS_ERRORS = [
    (
        "learning_rate=nan",
        dict(learning_rate=nan),
        ["learning_rate=nan", "finite and >= 0", "Fix: pass e.g. learning_rate="],
    ),
    ("adam_beta1=-0.1", dict(adam_beta1=-0.1), ["adam_beta1=-0.1", "in [0, 1)"]),
    ("adam_beta2=1.0", dict(adam_beta2=1.0), ["adam_beta2=1.0", "in [0, 1)", "Fix: pass e.g. adam_beta2=0.999"]),
    ("adam_epsilon=inf", dict(adam_epsilon=inf), ["adam_epsilon=inf", "finite"]),
    ("weight_decay=-0.01", dict(weight_decay=-0.01), ["weight_decay=-0.01", ">= 0"]),
    ("optim_target_modules=[]", dict(optim_target_modules=[]), ["optim_target_modules=[] would fold nothing", "Fix:"]),
    (
        "optim_target_modules='q_proj,v_proj'",
        dict(optim_target_modules="q_proj,v_proj"),
        [
            "optim_target_modules='q_proj,v_proj' is one string",
            "Fix: a list (['q_proj', 'v_proj']), or optim_args target_modules=q_proj;v_proj.",
        ],
    ),
    ("optim_target_modules=''", dict(optim_target_modules=""), ["optim_target_modules='' names no module", "Fix:"]),
    (  # the targets fold with block_size: with 1 they folded nothing, silently
        "optim_target_modules with block_size=1",
        dict(optim_target_modules=["q_proj"], optim_args="level=0"),
        ["optim_target_modules=['q_proj'] names the modules that fold with block_size, which is 1", "Fix: a"],
    ),
    (
        "optim_target_modules='(q'",
        dict(optim_target_modules="(q"),
        ["optim_target_modules='(q' is not a valid regex", "Fix:"],
    ),
    (
        "optim_target_modules=['q_proj(']",
        dict(optim_target_modules=["v_proj", "q_proj("]),
        ["optim_target_modules[1]='q_proj(' is not a valid regex", "suffixes", "Fix: escape it"],
    ),
    (
        "targets in optim_target_modules and in optim_args",
        dict(optim_target_modules=["q_proj"], optim_args="target_modules=v_proj"),
        ["target modules are given twice: optim_target_modules=['q_proj'] and target_modules=['v_proj']", "Fix"],
    ),
    (
        "optim_target_modules=['q_proj', '']",
        dict(optim_target_modules=["q_proj", ""]),
        ["optim_target_modules[1]='' is not a module name", "non-empty string", "Fix: e.g."],
    ),
    (
        "FoamConfig whose target the optim_args string cannot carry",
        dict(optim_args=FoamConfig(target_modules=r".*layers\.[0-9]{1,2}\.mlp.*")),
        ["target_modules pattern", "contains ','", "cannot carry", "[0-9][0-9]? for [0-9]{1,2}"],
    ),
    (
        "mapping whose target the optim_args string cannot carry",
        dict(optim_args={"target_modules": ["q_proj;v_proj"]}),
        ["target_modules pattern 'q_proj;v_proj' contains ';'", "Fix:"],
    ),
    ("foam_layerwise with clipping", dict(optim="foam_layerwise", max_grad_norm=1.0), ["max_grad_norm=0"]),
    ("foam_layerwise with fp16", dict(optim="foam_layerwise", max_grad_norm=0.0, fp16=True), ["bf16=True"]),
    (
        "foam_layerwise with auto_find_batch_size",
        dict(optim="foam_layerwise", max_grad_norm=0.0, auto_find_batch_size=True),
        ["auto_find_batch_size=True", "stepped, the others not", "Fix: set per_device_train_batch_size"],
    ),
    (
        "FSDP1",
        dict(fsdp=True, fsdp_config={"version": 1}),
        ["optim='foam' with FSDP1", "flat one-dimensional shards", "never fold", "Fix: use FSDP2", "'version': 2"],
    ),
]


def assert_fragments(message: str, fragments: list[str]) -> None:
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"


# ============================================================================ res_scale = 0

# One row of two blocks of 4: the first block's residual is finite but its square overflows fp32 (|R| > 1.8e19).
OVERFLOWING_RESIDUAL = [[3e19, -3e19, 1e19, 0.0, 1.0, -2.0, 0.5, 0.25]]


def step_without_residual(start, grad, second_moment, hparams):
    """One step from zero moments written from the math with ρ = 0, where M = unfold(m̃) and V = unfold(ṽ) hold no
    residual term at all; in fp32, as the optimizer computes (a block mean of G⊙G may overflow to inf there)."""
    lr, (b1, b2), eps, wd = hparams["lr"], hparams["betas"], hparams["eps"], hparams["weight_decay"]
    blocks = grad.reshape(1, 2, 4)
    g_mean = blocks.mean(-1)
    g2 = (blocks * blocks).mean(-1) if second_moment == "mean_sq" else g_mean * g_mean
    m, v = (1 - b1) * g_mean, (1 - b2) * g2
    update = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    return start * (1 - lr * wd) - lr * update.repeat_interleave(4, dim=-1).reshape(start.shape)


def zero_res_scale_step(path, second_moment):
    """(weights after one step of ``path`` with res_scale=0 on OVERFLOWING_RESIDUAL, step_without_residual's)."""
    start = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    param = start.clone().requires_grad_()
    opt = FOAM([param], block_size=4, res_scale=0.0, second_moment=second_moment, **HPARAMS["decay"], **PATHS[path])
    grad = torch.tensor(OVERFLOWING_RESIDUAL)
    param.grad = grad.clone()
    opt.step()
    return param.detach(), step_without_residual(start, grad, second_moment, HPARAMS["decay"])
