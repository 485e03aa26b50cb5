"""The fused CUDA step of FOAM: Triton kernels, a launch per large tensor and one for many small ones, no full-size
temporaries.

The same math, constants and order of operations as the fused CPU kernel (``csrc/foam_cpu.cpp``) and the
readable path (:func:`foam_hf.functional._single_tensor_foam`), which the tests hold it to:

* a folded tensor ``(*rows, n)`` is viewed as ``rows x n``; program ``(r, t)`` takes ``KB`` blocks of row
  ``r`` as a ``KB x BP`` tile (``BP`` = ``min(B, n)`` rounded up to a power of two, the extra lanes masked), so any
  block size works and the ragged last block of a row averages over its own entries only;
* per block: ``g̃``, ``g̃⁽²⁾``, ``m̃ ← lerp(m̃, g̃, 1−β1)``, ``ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾``; per entry:
  ``R = G − g̃``, ``M = m̃ + ρR``, ``V = ṽ + ρ²R²``, ``W ← W(1−γλ) + c · M / (√V + ε√bc2)`` with
  ``c = −γα√bc2 / bc1`` (ε moved inside the bias-corrected root, one division per entry);
* unfolded tensors (1-D, or ``B = 1``) take AdamW's update in a 1-D kernel;
* launches: a tensor of at least ``_SHARED_MAX_ENTRIES`` entries gets its own (the grid above); smaller tensors of
  one kind (folded or not, dtypes, step count, tile width) share one, over an int64 table of their addresses and
  sizes, program ``(i, p)`` taking every ``P``-th tile of tensor ``i``. A launch costs microseconds of host time
  whatever its size, and most of a model's tensors are small (norms, biases, small projections). Both kinds run the
  same per-tile code (``_fold_tile``, ``_adamw_span``), so a tensor steps the same bits in either.

Square roots and divisions are IEEE round-to-nearest (``tl.sqrt_rn``, ``tl.div_rn``), not the GPU's fast
approximations, and no ``a·b + c`` is contracted into a fused multiply-add (``enable_fp_fusion=False``, as
Triton's interpreter computes), so results match the CPU paths to rounding. G and W are read once and W written once per
entry, W in the parameter's dtype and G in its own (an fp32 gradient of a bf16 weight is not rounded first); moments
are float32, or bfloat16 (``state_dtype="bfloat16"``): loaded into fp32, updated, used for the step, and stored
with the stochastic rounding of the other paths (:func:`foam_hf.precision.store_moment`), the same counter hash of
(index, step, salt) computed in-kernel, so a bf16 moment comes out bit for bit what the readable path stores for
the same fp32 value. The new W is computed in fp32 and rounded to nearest into bf16 and fp16 (round-to-nearest-even,
as torch stores it), or, for bf16 parameters under ``weight_rounding="stochastic"`` (a compile-time flag: their own
kernels, so the default's are unchanged), stochastically by the same hash with the weights' salt
(:data:`foam_hf.precision.WEIGHT_SALT`) and the entry's C-order index in the parameter as counter: bit for bit
:func:`foam_hf.precision.store_weight` of the same fp32 value.

Triton ships with the CUDA builds of torch; without it this module still imports and reports the path
unavailable. Tests run the kernels on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set before
this module is imported), which checks their logic but says nothing of their speed on a GPU, and compile every
launch for sm_80 and sm_90 (``tests/test_triton_cuda_compile.py``), which a GPU-less machine can do too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterable

import torch

from foam_hf.distributed import PLAIN_TENSOR_TYPES
from foam_hf.folding import folded_shape, is_foldable
from foam_hf.precision import WEIGHT_SALT
from foam_hf.step_scalars import step_constants

try:  # Triton ships with torch's CUDA builds; without it this path is simply unavailable.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = [
    "DEFAULT_CHECK_KINDS",
    "MAX_BLOCK_WIDTH",
    "TRITON_DTYPES",
    "CheckKind",
    "block_width",
    "triton_available",
    "triton_ready",
    "triton_supported",
]

logger = logging.getLogger(__name__)

#: Parameter dtypes the Triton kernels step (moments are float32 or bfloat16).
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
#: Gradient dtypes the kernels load, whatever the parameter's (FSDP2 may reduce bf16 parameters' gradients in fp32).
_GRAD_DTYPES: tuple[torch.dtype, ...] = TRITON_DTYPES

# Tile sizes: entries per program of the folded kernel (KB · BP, at least one block) and of the 1-D kernel.
_TILE = 2048
#: Moment dtypes the kernels store (bfloat16 with stochastic rounding).
STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
# The counter hash of foam_hf.precision.rounding_dither: the per-(step, salt) key is computed here, once a step.
_HASH_STEP, _HASH_SALT, _MASK32 = 0x85EBCA77, 0xC2B2AE3D, 0xFFFFFFFF
#: The salts of the rounding hash: exp_avg's, exp_avg_sq's (foam_hf.precision.store_moment's callers) and the
#: weights' (:data:`foam_hf.precision.WEIGHT_SALT`), in the order of the keys in :data:`_STEP_KEYS`.
_SALTS = (0, 1, WEIGHT_SALT)
#: The kernels' arguments that change every step: the rounding hash's keys. Triton compiles a kernel per class of
#: int argument (i32 or i64, divisible by 16 or not, equal to 1), so they are passed as signed 32-bit ints (the
#: kernels take their bits back with ``.to(tl.uint32)``) and declared ``do_not_specialize``: one compilation for
#: every step, where the plain keys moved through a dozen classes in the first hundred steps.
_STEP_KEYS = ("key_m", "key_v", "key_w")
_ADAMW_BLOCK = 1024
#: The widest block the folded kernels step: ``min(block_size, n)`` entries (a block never holds more than its
#: row's ``n``), padded to a power of two as one tile row. Triton refuses tiles of more than 2**20 entries, and a
#: block this wide already fills a program; wider ones take the foreach path (``fused=None``) or are refused.
MAX_BLOCK_WIDTH = 1 << 16
#: Options of every launch. No contraction of a·b + c into one fused multiply-add: the kernels then round as
#: they read, as in Triton's interpreter (where the tests run them), whatever Triton's default (which changes
#: in 3.10).
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}
#: Warps of a folded launch whose tile holds ``_TILE`` entries or fewer: Triton's default. A block wider than a
#: tile is a tile of its own, and at 4 warps its entries per thread, and registers, grow with it (compiled for
#: sm_90: 127 registers at B=4096, 254 at B=8192, and 7.7 s to compile at B=65536); see :func:`_fold_warps`.
_WARPS = 4


def _fold_warps(constexprs: dict) -> int:
    """The warps of a folded launch: 4 (Triton's default) for tiles of up to ``_TILE`` entries, and as many more as
    keep the entries per thread those of a ``_TILE`` tile for wider ones, up to 32 (a CUDA block's 1024 threads):
    B=4096 takes 8 (71 registers on sm_90), B=8192 16 (68), B=65536 32 (0.4 s to compile). Launches of their own
    and shared ones take the same, so a tensor steps the same bits in either."""
    return min(32, _WARPS * max(1, constexprs["KB"] * constexprs["BP"] // _TILE))


#: Tensors under this many entries share launches: one per kernel, dtypes and step count, over a table of their
#: addresses. A launch costs microseconds of Python and driver time whatever its size, and a model's norms,
#: biases and small projections are most of its tensors but a small part of its entries; larger tensors keep a
#: launch each, whose arguments tell the compiler their alignment (the shared kernels load addresses and sizes
#: from the table, so they cannot vectorise on the same promise).
_SHARED_MAX_ENTRIES = 1 << 20
#: Programs a shared launch aims for in all (each tensor gets its share, at least one, at most one per tile).
_SHARED_PROGRAMS = 4096
#: The largest second (and third) dimension of a CUDA grid; the first takes 2**31 - 1.
_MAX_GRID_Y = 65535
_MAX_GRID_X = 2**31 - 1
#: The largest column a launch of its own may index: its tile index is the grid's int32 program id, so the columns
#: ``tile * KB * B + lane`` of a row are int32 (cheaper than int64 in registers); the shared kernel's are int64.
_MAX_INT32_COLUMN = 2**31 - 1
#: int64 columns of a table row: addresses of G, W, m̃ and ṽ, then n, blocks per row and rows (folded), or the
#: entry count (unfolded); the last is padding.
_TABLE_COLUMNS = 8


def triton_available() -> bool:
    """Whether Triton imports here (it comes with torch's CUDA builds)."""
    return triton is not None


#: What the self-check steps before the kernels step a group: (parameter dtype, moment dtype, block size, second
#: moment), and, where it is not ``"nearest"``, the group's weight rounding as a fifth part. Each compiles kernels of
#: its own (the dtypes, the block size, the tile width, the second moment's formula and whether bf16 weights are
#: stochastically rounded are compile-time constants), so each is checked before it first trains. Kinds that
#: compile the same kernels share one check and one verdict (:func:`_canonical_kind`).
CheckKind = tuple[torch.dtype, torch.dtype, int, str] | tuple[torch.dtype, torch.dtype, int, str, str]
#: The kinds ``triton_ready(device)`` checks when asked of no group in particular: fp32 parameters with fp32
#: moments and bf16 parameters with bf16 moments, at block size 4 with the default second moment.
DEFAULT_CHECK_KINDS: tuple[CheckKind, ...] = (
    (torch.float32, torch.float32, 4, "mean_sq"),
    (torch.bfloat16, torch.bfloat16, 4, "mean_sq"),
)
#: The self-check's verdicts, per device and kind of step.
_ready: dict[tuple[torch.device, CheckKind], bool] = {}

# The self-check's tolerances, those of tests/test_fused_triton.py: (weight atol, weight rtol) per parameter
# dtype, and the moments' rtol per state dtype (bf16 moments may round to a neighbouring value). bf16 weights may
# land on the neighbouring value, rounded to nearest or stochastically: one spacing, at most 2**-7 of the value.
# fp16 weights, whose neighbours are 2**-10 to 2**-11 apart relatively, get two spacings: the tests hold them to one.
_CHECK_WEIGHT_TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 2**-7), torch.float16: (1e-6, 2**-9)}
_CHECK_MOMENT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}
#: What :func:`parity_checks` names the share of a step's stochastically rounded bf16 weights that the kernels put on
#: the other neighbour than the readable path does, and the most it lets pass. One spacing apart, every such weight
#: is within the weight tolerance whichever neighbour it takes, so only this share tells a right dither from a wrong
#: one. The kernels' fp32 weight is an ulp or so from torch's, and under one dither two values k fp32 ulps apart
#: round apart with probability k / 2**16: a right kernel rounds some 1e-5 to 1e-4 of its weights the other way
#: (none of the scratch problem's hundreds, in most runs). A dither unrelated to the readable path's (a wrong salt,
#: index or step key, a miscompiled hash) rounds a third the other way (an entry a fraction f of a spacing above its
#: lower neighbour disagrees with probability 2f(1 - f), 1/3 on average over f), one biased to truncation (no
#: dither) half. A sixteenth lies far from both.
_ROUNDED_OTHERWISE = "share of weights rounded to the other bf16 neighbour"
#: The same share for bf16 moments (``state_dtype="bfloat16"``), pooled over both moments of the step's tensors: a
#: moment within one spacing passes the moment tolerance whichever neighbour it takes, so only this share tells a
#: right moment dither from a wrong or biased one. The scratch problem holds 36 to 48 moment entries at B >= 4, so a
#: right kernel's one or two disagreements stay under the allowance and a wrong dither's third of them does not.
_MOMENTS_ROUNDED_OTHERWISE = "share of moments rounded to the other bf16 neighbour"
_CHECK_ROUNDED_OTHERWISE = 1 / 16
_CHECK_STEPS = 2  # the second step starts from stored moments


def _scratch_shapes(block_size: int) -> list[tuple[int, ...]]:
    """The self-check's tensors at ``block_size``: a folded weight of whole blocks whose rows are a multiple of 16
    entries (the aligned kernels), one whose rows end in a ragged block (odd rows: the unaligned kernels), and two
    1-D biases (the AdamW kernel), of 5 and 16 entries. Rows hold at least a block, so the tile is the one a
    group's large weights compile (``BP`` = the block size rounded up to a power of two); blocks wider than
    :data:`MAX_BLOCK_WIDTH`, which the kernels never step, are checked on rows of one block as wide as they go.
    From ``block_size = 2`` on, a weight of rows narrower than a block (half of one) too: such rows compile a
    narrower tile of their own (``BP`` = the row's width rounded up), which a group with such a tensor runs."""
    width = min(block_size, MAX_BLOCK_WIDTH)
    whole = width * 16 // math.gcd(width, 16)
    ragged = 2 * width + 1 if block_size <= MAX_BLOCK_WIDTH else MAX_BLOCK_WIDTH - 1
    narrow = [(2, max(1, width // 2))] if block_size >= 2 else []
    return [(4, whole), (3, ragged), *narrow, (5,), (16,)]


def _problem(
    device: torch.device,
    kind: CheckKind,
    shapes: list[tuple[int, ...]],
    steps: int,
    seed: int = 0,
    grad_dtype: torch.dtype | None = None,
):
    """A seeded step problem of ``kind`` over ``shapes``, so every check steps the same numbers: parameters, a list
    of gradients per step (in ``grad_dtype``, default the parameters'), and zero moments."""
    dtype, state_dtype, block_size, *_ = kind
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device, grad_dtype or dtype) for s in shapes] for _ in range(steps)]
    state_shapes = [folded_shape(p.shape, block_size) if is_foldable(p, block_size) else p.shape for p in params]
    exp_avgs = [torch.zeros(s, device=device, dtype=state_dtype) for s in state_shapes]
    exp_avg_sqs = [torch.zeros(s, device=device, dtype=state_dtype) for s in state_shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def _kind_parts(kind: CheckKind) -> tuple[torch.dtype, torch.dtype, int, str, str]:
    """``kind``'s five parts: a kind of four steps with ``weight_rounding="nearest"``."""
    dtype, state_dtype, block_size, second_moment, *rounding = kind
    return dtype, state_dtype, block_size, second_moment, rounding[0] if rounding else "nearest"


def _canonical_kind(kind: CheckKind) -> CheckKind:
    """``kind`` as the self-check keys its verdicts, one per set of compiled kernels: five parts for bf16 weights
    under ``weight_rounding="stochastic"`` (kernels of their own), four for every other kind, whose kernels store
    weights as ``"nearest"`` does (other dtypes are never stochastically rounded, so compile the same kernels)."""
    dtype, state_dtype, block_size, second_moment, weight_rounding = _kind_parts(kind)
    if dtype == torch.bfloat16 and weight_rounding == "stochastic":
        return dtype, state_dtype, block_size, second_moment, weight_rounding
    return dtype, state_dtype, block_size, second_moment


def _describe(kind: CheckKind) -> str:
    dtype, state_dtype, block_size, second_moment, weight_rounding = _kind_parts(kind)
    described = f"{dtype} parameters, {state_dtype} moments, block_size={block_size}, second_moment={second_moment!r}"
    return described + (f", weight_rounding={weight_rounding!r}" if weight_rounding != "nearest" else "")


#: The self-check's hyper-parameters (and the GPU check's): a large lr and weight decay, so a wrong term shows.
_CHECK_HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, scale=1.0, res_scale=1.0)


def parity_checks(
    device: torch.device,
    kind: CheckKind,
    shapes: list[tuple[int, ...]],
    steps: int,
    *,
    shared_max_entries: int | None = None,
    seed: int = 0,
    scale: float | None = None,
    res_scale: float | None = None,
    grad_dtype: torch.dtype | None = None,
) -> Iterable[tuple[int, str, torch.Tensor, torch.Tensor, float, float]]:
    """Step a seeded problem of ``kind`` over ``shapes`` with the kernels and with the readable path
    (:func:`foam_hf.functional._single_tensor_foam`) on ``device``, ``steps`` times; after each step yield, per
    tensor, ``(step, name, kernels' value, readable path's value, atol, rtol)``: the tolerances of the tests.
    ``scale``, ``res_scale`` and ``grad_dtype`` (gradients of another dtype than the parameters, as FSDP2's fp32
    reduction gives bf16 weights) vary the problem from the self-check's.

    Every step starts from the same weights and moments on both sides (the readable path's, copied over). The
    kernels never contract ``a·b + c`` into one rounding and sum a block in their own order, so their fp32 moments
    can differ from torch's by an ulp or so; stochastically rounded into bf16, such a moment now and then lands on
    the neighbouring bf16 value, which the moment tolerance allows. Carried into the next step, though, that
    neighbour moves the weight by ~lr·2⁻⁸, beyond the weight tolerance: a right kernel would fail. From the same
    inputs each step is held to the tolerances, and a wrong kernel is caught at the first step it is wrong.

    Stochastically rounded bf16 weights (a kind whose fifth part is ``"stochastic"``) are held to one spacing as
    well, which any neighbour of the fp32 weight passes: after their per-tensor checks each step also yields, as
    ``(step, _ROUNDED_OTHERWISE, share, 0, _CHECK_ROUNDED_OTHERWISE, 0)``, the share of all its bf16 weights the
    kernels rounded to the other neighbour than the readable path did, which a wrong or biased dither drives far
    above the allowance (:data:`_CHECK_ROUNDED_OTHERWISE`). bf16 moments yield the same share
    (:data:`_MOMENTS_ROUNDED_OTHERWISE`), pooled over both moments.
    """
    from .functional import _single_tensor_foam

    dtype, state_dtype, block_size, second_moment, weight_rounding = _kind_parts(kind)
    stochastic_weights = _canonical_kind(kind)[4:] == ("stochastic",)
    hyper = dict(_CHECK_HYPER, block_size=block_size, second_moment=second_moment, weight_rounding=weight_rounding)
    hyper |= {k: v for k, v in (("scale", scale), ("res_scale", res_scale)) if v is not None}
    kernel = _problem(device, kind, shapes, steps, seed, grad_dtype)
    readable = _problem(device, kind, shapes, steps, seed, grad_dtype)
    kernel_steps = [torch.tensor(0.0) for _ in shapes]
    readable_steps = [torch.tensor(0.0) for _ in shapes]
    atol, rtol = _CHECK_WEIGHT_TOLERANCES[dtype]
    for step in range(steps):
        _fused_foam_triton(
            kernel[0], kernel[1][step], kernel[2], kernel[3], kernel_steps, shared_max_entries=shared_max_entries,
            **hyper,
        )  # fmt: skip
        _single_tensor_foam(readable[0], readable[1][step], readable[2], readable[3], readable_steps, **hyper)
        for got, want in zip(kernel[0], readable[0]):
            yield step, "weight", got, want, atol, rtol
        if stochastic_weights:  # pooled over the step's weights: a share of hundreds of entries, not of a bias's 5
            share = _share_rounded_otherwise(list(zip(kernel[0], readable[0])))
            yield step, _ROUNDED_OTHERWISE, share, torch.tensor(0.0), _CHECK_ROUNDED_OTHERWISE, 0.0
        for name, index in (("exp_avg", 2), ("exp_avg_sq", 3)):
            for got, want in zip(kernel[index], readable[index]):
                scale = want.float().abs().max().item() if want.numel() else 0.0
                yield step, name, got, want, 1e-6 * scale + 1e-30, _CHECK_MOMENT_RTOL[state_dtype]
        if state_dtype == torch.bfloat16:  # as for the weights above: only the share tells the dither
            moments = [(got, want) for index in (2, 3) for got, want in zip(kernel[index], readable[index])]
            share = _share_rounded_otherwise(moments)
            yield step, _MOMENTS_ROUNDED_OTHERWISE, share, torch.tensor(0.0), _CHECK_ROUNDED_OTHERWISE, 0.0
        for index in (0, 2, 3):  # the next step from the same inputs
            for got, want in zip(kernel[index], readable[index]):
                got.copy_(want)


def _share_rounded_otherwise(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The share of all entries of ``pairs`` (kernels' tensor, readable path's tensor) whose values differ: where both
    are within one bf16 spacing, the share the kernels rounded to the other neighbour (a 0-d tensor)."""
    other = sum(int((got != want).sum()) for got, want in pairs)
    return torch.tensor(other / max(1, sum(got.numel() for got, _ in pairs)))


def _self_check_mismatch(device: torch.device, kind: CheckKind = DEFAULT_CHECK_KINDS[0]) -> str | None:
    """Step the scratch problem of ``kind`` (:func:`_scratch_shapes`) with the kernels and with the readable path
    on ``device`` (:func:`parity_checks`), each tensor in a launch of its own and then all in shared launches;
    describe the first disagreement beyond the tests' tolerances (``None`` when they agree)."""
    shapes = _scratch_shapes(kind[2])
    for shared in (0, sys.maxsize):  # each tensor in a launch of its own, then all of them in shared ones
        for step, name, got, want, atol, rtol in parity_checks(
            device, kind, shapes, _CHECK_STEPS, shared_max_entries=shared
        ):
            got, want = got.float(), want.float()
            if not torch.allclose(got, want, atol=atol, rtol=rtol):
                worst = (got - want).abs().nan_to_num(float("inf")).max().item()
                launch = "shared launches" if shared else "a launch per tensor"
                shape = f" of shape {tuple(got.shape)}" if got.dim() else ""  # a tensor's, not a share's
                return (
                    f"{name}{shape} ({_describe(kind)}, {launch}) differs from "
                    f"the readable path after step {step + 1} by up to {worst:.3g} (atol={atol:.3g}, rtol={rtol:.3g})"
                )
    return None


def triton_ready(device: torch.device, kinds: Iterable[CheckKind] | None = None) -> bool:
    """Whether the kernels compile, run *and compute FOAM's step* on ``device`` for every kind of step in
    ``kinds`` (:data:`CheckKind`: parameter dtype, moment dtype, block size, second moment, and the weight rounding
    where not ``"nearest"``; default :data:`DEFAULT_CHECK_KINDS`): checked once per device and set of kernels
    (:func:`_canonical_kind`).

    The check steps a small seeded problem of that kind (:func:`_scratch_shapes`: a weight of whole blocks, a
    ragged one, one of rows narrower than a block, and two biases; two steps, each from the same inputs, with a
    launch per tensor and with shared launches) with the kernels and with the readable path
    :func:`foam_hf.functional._single_tensor_foam` on the same device and inputs, and
    compares weights and moments within the tolerances of the tests. ``fused=None`` asks it of each group's kinds
    before choosing the Triton path, so a Triton or driver that cannot build these kernels, or that builds them
    wrong, costs one logged warning and the foreach path (same results, more memory traffic), never a failed or
    silently wrong training run. (``fused=True`` does not ask: its errors surface as they are.)
    """
    if not triton_available():
        return False
    device = _indexed(torch.device(device))
    kinds = DEFAULT_CHECK_KINDS if kinds is None else kinds
    return all(_ready_for(device, _canonical_kind(kind)) for kind in kinds)


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device, as tensors made on it say (``cuda:0``), so a
    verdict asked of either is the one verdict (else the check would run again, and be cached twice)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _ready_for(device: torch.device, kind: CheckKind) -> bool:
    """:func:`triton_ready` for one kind: the cached verdict, or the self-check's, with its one warning."""
    key = (device, kind)
    if key not in _ready:
        try:
            mismatch = _self_check_mismatch(device, kind)
        except Exception as exc:  # noqa: BLE001 - any failure to build or run means "use the foreach path"
            _ready[key] = False
            logger.warning(
                "FOAM: the Triton kernels could not run on %s (%s), so FOAM uses its foreach path there (same "
                "results, more memory traffic). Reason: %s: %s",
                device,
                _describe(kind),
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )
        else:
            _ready[key] = mismatch is None
            if mismatch is not None:
                logger.warning(
                    "FOAM: the Triton kernels ran on %s but their self-check step disagrees with the readable "
                    "path: %s. FOAM uses its foreach path there (same results as the readable path, more memory "
                    "traffic); please report this with the output of `foam-hf env`.",
                    device,
                    mismatch,
                )
    return _ready[key]


def triton_supported(param: torch.Tensor, block_size: int | None = None) -> bool:
    """Whether the Triton kernels can step ``param``: a dense, contiguous CUDA tensor of a :data:`TRITON_DTYPES`,
    and, given the group's ``block_size``, blocks of at most :data:`MAX_BLOCK_WIDTH` entries (:func:`block_width`)."""
    return (
        param.device.type == "cuda"
        and param.dtype in TRITON_DTYPES
        and param.layout == torch.strided
        and param.is_contiguous()
        and type(param) in PLAIN_TENSOR_TYPES
        and (block_size is None or block_width(param, block_size) <= MAX_BLOCK_WIDTH)
    )


def block_width(param: torch.Tensor, block_size: int) -> int:
    """The entries of ``param``'s widest block under ``block_size``: ``min(block_size, n)`` for a folded tensor
    (rows of ``n`` entries), 1 for one that keeps AdamW's states."""
    return min(block_size, param.shape[-1]) if is_foldable(param, block_size) else 1


def moments_supported(param: torch.Tensor, exp_avg: torch.Tensor) -> bool:
    """Whether the kernels read and write ``exp_avg``, a moment of ``param``, in place: a dense, contiguous float32
    or bfloat16 tensor on the parameter's device (they index it in C order from its address)."""
    return (
        exp_avg.dtype in STATE_DTYPES
        and exp_avg.layout == torch.strided
        and exp_avg.is_contiguous()
        and exp_avg.device == param.device
    )


def _tensor_problem(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    block_size: int,
) -> tuple[str, str] | None:
    """Why the kernels cannot step ``param`` with these tensors, as ``(reason, fix)``, or ``None`` where they can:
    the fused CPU kernel's checks (``csrc/foam_cpu.cpp``). The kernels index every tensor from its address in C
    order, so a moment of the wrong size would be read and written past its end, a transposed one in the wrong
    layout. Gradients are read in their own dtype (float32, bfloat16 or float16; others are copied to float32, as
    the readable path computes) and strided ones copied first, so only their device and shape matter."""
    fused_none = "pass fused=None or False for this group"
    if param.dtype not in TRITON_DTYPES:
        return "the kernels step float32, bfloat16 and float16 parameters", fused_none
    if param.layout != torch.strided:
        return f"the kernels step dense parameters; its layout is {param.layout}", fused_none
    if not param.is_contiguous():
        return f"the kernels step contiguous parameters; its strides are {param.stride()}", fused_none
    if block_width(param, block_size) > MAX_BLOCK_WIDTH:
        return (
            f"at block_size={block_size} its blocks hold {block_width(param, block_size)} entries, and the kernels "
            f"step blocks of at most {MAX_BLOCK_WIDTH}",
            "pass a smaller block_size for this tensor's group, or fused=None or False (the foreach path steps any)",
        )
    if grad.device != param.device or grad.layout != torch.strided:
        return (
            f"its gradient is a {grad.layout} tensor on {grad.device}",
            "pass dense gradients on the parameter's device",
        )
    if grad.shape != param.shape:
        return f"its gradient has shape {tuple(grad.shape)}", "pass each parameter's own gradient"
    if exp_avg.dtype != exp_avg_sq.dtype or exp_avg.dtype not in STATE_DTYPES:
        return (
            f"the kernels store moments in float32 or bfloat16; got {exp_avg.dtype} and {exp_avg_sq.dtype}",
            fused_none,
        )
    folded = is_foldable(param, block_size)
    expected = param.numel() // param.shape[-1] * _cdiv(param.shape[-1], block_size) if folded else param.numel()
    for name, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not moments_supported(param, moment):  # its dtype passed above: the layout or the device
            layout = f"strides {moment.stride()}" if moment.layout == torch.strided else str(moment.layout)
            return (
                f"{name} (shape {tuple(moment.shape)}, {layout}, on {moment.device}) is not a contiguous tensor on "
                "the parameter's device, which the kernels read and write in C order",
                f"pass {name}.contiguous() on {param.device} (FOAM keeps its moments so), or fused=None or False",
            )
        if moment.numel() != expected:
            layout = (
                f"folded shape {tuple(folded_shape(param.shape, block_size))}" if folded else "the parameter's shape"
            )
            return (
                f"{name} of shape {tuple(moment.shape)} holds {moment.numel()} entries; at block_size={block_size} the "
                f"kernels read and write {expected} ({layout})",
                f"step with the block_size the moments were built for, or build them with "
                f"foam_hf.folding.folded_shape(param.shape, {block_size}) as FOAM does",
            )
    if step.numel() != 1:
        return f"its step count has {step.numel()} entries", "pass one scalar tensor per parameter in state_steps"
    return None


def _check_launch(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    block_size: int,
) -> None:
    """Raise, before anything changes, where the kernels cannot step these lists (:func:`_tensor_problem`). The
    common case, lists they step, is answered by :func:`_launchable` in one fast loop."""
    if _launchable(params, grads, exp_avgs, exp_avg_sqs, state_steps, block_size):
        return
    lengths = [len(params), len(grads), len(exp_avgs), len(exp_avg_sqs), len(state_steps)]
    if len(set(lengths)) != 1:
        raise RuntimeError(
            "FOAM: the Triton step takes params, grads, exp_avgs, exp_avg_sqs and state_steps of one length; got "
            f"{lengths}. Fix: pass one gradient, two moments and one step count per parameter."
        )
    for index, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        problem = _tensor_problem(*tensors, block_size)
        if problem is not None:
            param = tensors[0]
            reason, fix = problem
            raise RuntimeError(
                f"FOAM: the Triton step cannot step params[{index}] (shape {tuple(param.shape)}, {param.dtype} on "
                f"{param.device}): {reason}. Fix: {fix}."
            )


def _launchable(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    block_size: int,
) -> bool:
    """Whether every tensor passes :func:`_check_launch`, the common case answered fast: the same rules, read once
    per tensor in one loop (~1 us a tensor, against ~2.5 us for the full check, which also says why). ``False``
    may be stricter than the rules (a strided gradient, which the step copies): the full check then decides."""
    if block_size > MAX_BLOCK_WIDTH or not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(
        state_steps
    ):
        return False
    strided = torch.strided
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        if not (
            param.layout is strided
            and grad.layout is strided
            and exp_avg.layout is strided
            and exp_avg_sq.layout is strided
            and param.dtype in TRITON_DTYPES
            and exp_avg.dtype in STATE_DTYPES
            and exp_avg_sq.dtype == exp_avg.dtype
            and param.is_contiguous()
            and exp_avg.is_contiguous()
            and exp_avg_sq.is_contiguous()
        ):
            return False
        device, shape, numel = param.device, param.shape, param.numel()
        if not (grad.device == device and exp_avg.device == device and exp_avg_sq.device == device):
            return False
        if grad.shape != shape or step.numel() != 1:
            return False
        if block_size > 1 and len(shape) >= 2 and numel:  # is_foldable: the folded moments' size
            n = shape[-1]
            numel = numel // n * -(-n // block_size)
        if exp_avg.numel() != numel or exp_avg_sq.numel() != numel:
            return False
    return True


if triton is not None:
    _TABLE_WIDTH = tl.constexpr(_TABLE_COLUMNS)
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _store_weight(ptrs, value, mask, index, key, OUT_BF16: tl.constexpr, STOCHASTIC_WEIGHTS: tl.constexpr):
        # fp32 -> the parameter's dtype. bf16 rounds to nearest even with integer ops, exactly as torch and the
        # CPU kernel do (NaN -> 0x7FC0), identical on a GPU and in Triton's interpreter (whose own cast truncates).
        # STOCHASTIC_WEIGHTS (bf16 parameters under weight_rounding="stochastic"): the moments' stochastic rounding
        # instead, as foam_hf.precision.store_weight does it: `key` is WEIGHT_SALT's and `index` the entry's C-order
        # index in the parameter.
        if STOCHASTIC_WEIGHTS:
            _store_moment(ptrs, value, mask, index, key, True)
        elif OUT_BF16:
            bits = value.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(value != value, 0x7FC0, rounded)
            tl.store(ptrs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_moment(ptrs, value, mask, index, key, STATE_BF16: tl.constexpr):
        # fp32 -> the moment's storage. bf16: stochastic rounding, foam_hf.precision.store_moment's arithmetic: the
        # dither of entry `index` is h = index·0x9E3779B1 + key (mod 2^32), h ^= h >> 16, h *= 0x7FEB352D,
        # h ^= h >> 15, dither = h & 0xFFFF; finite values become (bits + dither) >> 16, infinities keep their
        # bits, NaN becomes 0x7FC0 (torch's round-to-nearest of the non-finite values).
        if STATE_BF16:
            h = index.to(tl.uint32) * 0x9E3779B1 + key.to(tl.uint32)
            h ^= h >> 16
            h = h * 0x7FEB352D
            h ^= h >> 15
            bits = value.to(tl.uint32, bitcast=True)
            rounded = (bits + (h & 0xFFFF)) >> 16
            finite = (bits & 0x7F800000) != 0x7F800000
            rounded = tl.where(finite, rounded, tl.where(value != value, 0x7FC0, bits >> 16))
            tl.store(ptrs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptrs, value, mask=mask)

    @triton.jit
    def _fold_tile(
        g_ptr,
        w_ptr,
        m_ptr,
        v_ptr,
        row,
        tile,
        n,
        num_blocks,
        decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        rho,
        rho2,
        eps_bc2,
        step_c,
        key_m,
        key_v,
        key_w,
        B: tl.constexpr,
        BP: tl.constexpr,
        KB: tl.constexpr,
        MEAN_SQ: tl.constexpr,
        SMALL_WEIGHT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        STOCHASTIC_WEIGHTS: tl.constexpr,
    ):
        # Tile `tile` of row `row` of a folded tensor: KB blocks of B entries, as a KB x BP tile.
        k = tile * KB + tl.arange(0, KB)  # block indices of this tile
        lane = tl.arange(0, BP)
        col = k[:, None] * B + lane[None, :]
        in_block = (lane[None, :] < B) & (col < n) & (k[:, None] < num_blocks)
        has_block = k < num_blocks
        g = tl.load(g_ptr + row * n + col, mask=in_block, other=0.0).to(tl.float32)
        count = tl.minimum(n - k * B, B).to(tl.float32)  # < B only for the ragged last block of the row
        count = tl.where(has_block, count, 1.0)
        # g̃ = blockmean(G);  g̃⁽²⁾ = blockmean(G⊙G) or g̃⊙g̃
        grad_mean = tl.div_rn(tl.sum(g, axis=1), count)
        if MEAN_SQ:
            grad_sq_mean = tl.div_rn(tl.sum(g * g, axis=1), count)
        else:
            grad_sq_mean = grad_mean * grad_mean
        # m̃ ← lerp(m̃, g̃, 1−β1) (torch.lerp's two-sided formula);  ṽ ← β2 ṽ + (1−β2) g̃⁽²⁾
        moment_index = row * num_blocks + k  # C-order index in the moment (the hash's counter)
        m_old = tl.load(m_ptr + moment_index, mask=has_block, other=0.0).to(tl.float32)
        v_old = tl.load(v_ptr + moment_index, mask=has_block, other=0.0).to(tl.float32)
        if SMALL_WEIGHT:
            m_new = m_old + lerp_weight * (grad_mean - m_old)
        else:
            m_new = grad_mean - (grad_mean - m_old) * (1.0 - lerp_weight)
        v_new = v_old * beta2 + one_minus_beta2 * grad_sq_mean
        _store_moment(m_ptr + moment_index, m_new, has_block, moment_index, key_m, STATE_BF16)
        _store_moment(v_ptr + moment_index, v_new, has_block, moment_index, key_v, STATE_BF16)
        # R = G − unfold(g̃);  M = unfold(m̃) + ρR;  V = unfold(ṽ) + ρ²R⊙R;  W ← W(1−γλ) + c·M/(√V + ε√bc2)
        # R is 0 when ρ = 0, as the readable path skips it: ρ²·R⊙R would be 0·inf = NaN where R⊙R overflows.
        residual = tl.where(rho != 0.0, g - grad_mean[:, None], 0.0)
        first = m_new[:, None] + rho * residual
        second = v_new[:, None] + rho2 * (residual * residual)
        w_ptrs = w_ptr + row * n + col
        w = tl.load(w_ptrs, mask=in_block, other=0.0)
        w_new = w.to(tl.float32) * decay + step_c * tl.div_rn(first, tl.sqrt_rn(second) + eps_bc2)
        # the entry's C-order index in W is the counter of the weights' rounding hash (a kernel that stores to
        # nearest leaves it unused, and never computes it: its code is the one it was before the option)
        _store_weight(w_ptrs, w_new, in_block, row * n + col, key_w, OUT_BF16, STOCHASTIC_WEIGHTS)

    @triton.jit
    def _table_entry(
        table_ptr,
        GRAD_DTYPE: tl.constexpr,
        PARAM_DTYPE: tl.constexpr,
        STATE_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        # Row program_id(0) of a shared launch's table (_TABLE_COLUMNS): the addresses of G (GRAD_DTYPE, which may
        # differ from W's), W, m̃ and ṽ and the length (n folded, the entry count unfolded), each promised a
        # multiple of 16 where ALIGNED (every tensor of the launch is _vector_aligned, which the compiler cannot see
        # in loaded values).
        entry = table_ptr + tl.program_id(0) * _TABLE_WIDTH
        g_ptr = tl.load(entry + 0).to(tl.pointer_type(GRAD_DTYPE))
        w_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
        m_ptr = tl.load(entry + 2).to(tl.pointer_type(STATE_DTYPE))
        v_ptr = tl.load(entry + 3).to(tl.pointer_type(STATE_DTYPE))
        length = tl.load(entry + 4)
        if ALIGNED:
            g_ptr, w_ptr = tl.multiple_of(g_ptr, 16), tl.multiple_of(w_ptr, 16)
            m_ptr, v_ptr = tl.multiple_of(m_ptr, 16), tl.multiple_of(v_ptr, 16)
            length = tl.multiple_of(length, 16)
        return g_ptr, w_ptr, m_ptr, v_ptr, length

    @triton.jit(do_not_specialize=_STEP_KEYS)
    def _foam_fold_kernel(
        g_ptr,
        w_ptr,
        m_ptr,
        v_ptr,
        n,
        num_blocks,
        decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        rho,
        rho2,
        eps_bc2,
        step_c,
        key_m,
        key_v,
        key_w,
        B: tl.constexpr,
        BP: tl.constexpr,
        KB: tl.constexpr,
        MEAN_SQ: tl.constexpr,
        SMALL_WEIGHT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        STOCHASTIC_WEIGHTS: tl.constexpr,
    ):
        # One tensor per launch: program (r, t) steps tile t of row r.
        _fold_tile(
            g_ptr, w_ptr, m_ptr, v_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), n, num_blocks,
            decay, lerp_weight, beta2, one_minus_beta2, rho, rho2, eps_bc2, step_c, key_m, key_v, key_w,
            B, BP, KB, MEAN_SQ, SMALL_WEIGHT, OUT_BF16, STATE_BF16, STOCHASTIC_WEIGHTS,
        )  # fmt: skip

    @triton.jit(do_not_specialize=_STEP_KEYS)
    def _foam_fold_list_kernel(
        table_ptr,
        decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        rho,
        rho2,
        eps_bc2,
        step_c,
        key_m,
        key_v,
        key_w,
        GRAD_DTYPE: tl.constexpr,
        PARAM_DTYPE: tl.constexpr,
        STATE_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr,
        B: tl.constexpr,
        BP: tl.constexpr,
        KB: tl.constexpr,
        MEAN_SQ: tl.constexpr,
        SMALL_WEIGHT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        STOCHASTIC_WEIGHTS: tl.constexpr,
    ):
        # Many tensors per launch: program (i, p) steps tiles p, p + P, p + 2P, ... of the tensor in row i of
        # the table (its addresses, n, block count and rows: _TABLE_COLUMNS); P is the grid's second dimension.
        g_ptr, w_ptr, m_ptr, v_ptr, n = _table_entry(table_ptr, GRAD_DTYPE, PARAM_DTYPE, STATE_DTYPE, ALIGNED)
        entry = table_ptr + tl.program_id(0) * _TABLE_WIDTH
        num_blocks = tl.load(entry + 5)
        rows = tl.load(entry + 6)
        tiles_per_row = tl.cdiv(num_blocks, KB)
        for tile in range(tl.program_id(1).to(tl.int64), rows * tiles_per_row, tl.num_programs(1).to(tl.int64)):
            _fold_tile(
                g_ptr, w_ptr, m_ptr, v_ptr, tile // tiles_per_row, tile % tiles_per_row, n, num_blocks,
                decay, lerp_weight, beta2, one_minus_beta2, rho, rho2, eps_bc2, step_c, key_m, key_v, key_w,
                B, BP, KB, MEAN_SQ, SMALL_WEIGHT, OUT_BF16, STATE_BF16, STOCHASTIC_WEIGHTS,
            )  # fmt: skip

    @triton.jit
    def _adamw_span(
        g_ptr,
        w_ptr,
        m_ptr,
        v_ptr,
        start,
        numel,
        decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        eps_bc2,
        step_c,
        key_m,
        key_v,
        key_w,
        BLOCK: tl.constexpr,
        SMALL_WEIGHT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        STOCHASTIC_WEIGHTS: tl.constexpr,
    ):
        # AdamW's update (FOAM at B = 1) of the BLOCK entries from `start` of an unfolded tensor.
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m_old = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if SMALL_WEIGHT:
            m = m_old + lerp_weight * (g - m_old)
        else:
            m = g - (g - m_old) * (1.0 - lerp_weight)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * beta2 + one_minus_beta2 * g * g
        _store_moment(m_ptr + offsets, m, mask, offsets, key_m, STATE_BF16)
        _store_moment(v_ptr + offsets, v, mask, offsets, key_v, STATE_BF16)
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        w_new = w.to(tl.float32) * decay + step_c * tl.div_rn(m, tl.sqrt_rn(v) + eps_bc2)
        _store_weight(w_ptr + offsets, w_new, mask, offsets, key_w, OUT_BF16, STOCHASTIC_WEIGHTS)

    @triton.jit(do_not_specialize=_STEP_KEYS)
    def _adamw_kernel(
        g_ptr,
        w_ptr,
        m_ptr,
        v_ptr,
        numel,
        decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        eps_bc2,
        step_c,
        key_m,
        key_v,
        key_w,
        BLOCK: tl.constexpr,
        SMALL_WEIGHT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        STOCHASTIC_WEIGHTS: tl.constexpr,
    ):
        # One tensor per launch: program p steps entries [p·BLOCK, (p+1)·BLOCK).
        _adamw_span(
            g_ptr, w_ptr, m_ptr, v_ptr, tl.program_id(0).to(tl.int64) * BLOCK, numel,
            decay, lerp_weight, beta2, one_minus_beta2, eps_bc2, step_c, key_m, key_v, key_w,
            BLOCK, SMALL_WEIGHT, OUT_BF16, STATE_BF16, STOCHASTIC_WEIGHTS,
        )  # fmt: skip

    @triton.jit(do_not_specialize=_STEP_KEYS)
    def _adamw_list_kernel(
        table_ptr,
        decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        eps_bc2,
        step_c,
        key_m,
        key_v,
        key_w,
        GRAD_DTYPE: tl.constexpr,
        PARAM_DTYPE: tl.constexpr,
        STATE_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
        SMALL_WEIGHT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        STOCHASTIC_WEIGHTS: tl.constexpr,
    ):
        # Many tensors per launch, as _foam_fold_list_kernel: program (i, p) steps spans p, p + P, ... of tensor i.
        g_ptr, w_ptr, m_ptr, v_ptr, numel = _table_entry(table_ptr, GRAD_DTYPE, PARAM_DTYPE, STATE_DTYPE, ALIGNED)
        for span in range(tl.program_id(1).to(tl.int64), tl.cdiv(numel, BLOCK), tl.num_programs(1).to(tl.int64)):
            _adamw_span(
                g_ptr, w_ptr, m_ptr, v_ptr, span * BLOCK, numel,
                decay, lerp_weight, beta2, one_minus_beta2, eps_bc2, step_c, key_m, key_v, key_w,
                BLOCK, SMALL_WEIGHT, OUT_BF16, STATE_BF16, STOCHASTIC_WEIGHTS,
            )  # fmt: skip


@torch.compiler.disable  # eager under torch.compile, as the C++ kernel (opaque to Dynamo, a graph break) runs
def _fused_foam_triton(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int,
    scale: float,
    res_scale: float,
    second_moment: str,
    weight_rounding: str = "nearest",
    shared_max_entries: int | None = None,
) -> None:
    """The CUDA fused path, the ``impl`` :func:`foam_hf.functional.foam` picks on CUDA: one kernel launch per tensor
    of at least ``shared_max_entries`` entries (default :data:`_SHARED_MAX_ENTRIES`; 0 gives every tensor its own),
    and one per kind of smaller tensor (folded or not, dtypes of gradient, parameter and moments, step count,
    :func:`_vector_aligned` or not, tile width) for all of them, through a table of their addresses. Both launches
    run the same per-tile code, so a tensor steps the same bits either way.

    The bias corrections come from ``state_steps`` (CPU scalars, as in torch's Adam), so a step never waits
    on the GPU. Gradients are read in their own dtype, not rounded to the parameter's (an fp32 gradient of a bf16
    parameter steps as the readable path steps it, with no copy); only strided gradients, and those of a dtype the
    kernels do not load (copied to float32, the dtype the readable path computes in), are copied first.
    ``weight_rounding="stochastic"`` stores the new weights of bf16 parameters with
    :func:`foam_hf.precision.store_weight`'s stochastic rounding, bit for bit for the same fp32 values (a constexpr of
    their own kernels: the default ``"nearest"`` compiles and steps as before); other dtypes are stored as with
    ``"nearest"``, as that function stores them (fp16 parameters, which the optimizer refuses under
    ``"stochastic"``, to nearest). :func:`foam_hf.functional.foam` checks first that the kernels cover every tensor
    (:func:`foam_hf.implementation.check_fused_tensors`).
    """
    if not params:
        return
    _check_launch(params, grads, exp_avgs, exp_avg_sqs, state_steps, block_size)  # before the step counts change

    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size, scale=scale,
        res_scale=res_scale, second_moment=second_moment, weight_rounding=weight_rounding, memo={},
    )  # fmt: skip
    if shared_max_entries is None:
        shared_max_entries = _SHARED_MAX_ENTRIES
    torch._foreach_add_(state_steps, 1)
    steps = torch.stack(state_steps).tolist() if len({s.device for s in state_steps}) == 1 else None
    # Per device (a model spread over GPUs in one process, as device_map="auto" does): the tensors with launches of
    # their own, and the smaller ones by kind; each device's launches then run with it as the current device.
    own: dict[torch.device, list[tuple]] = {}
    shared: dict[torch.device, dict[tuple, list[tuple[torch.Tensor, ...]]]] = {}
    for index, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        numel = param.numel()
        if numel == 0:
            continue
        if grad.dtype not in _GRAD_DTYPES:  # fp64, say: the readable path computes these in fp32
            grad = grad.to(torch.float32)
        if not grad.is_contiguous():
            grad = grad.contiguous()
        step = steps[index] if steps is not None else state_steps[index].item()
        folded = block_size > 1 and param.dim() >= 2  # is_foldable, numel > 0 known: once per tensor, inline
        tensors = (grad, param, exp_avg, exp_avg_sq)
        if numel < shared_max_entries:  # one tile width per launch: tensors of n < B get narrower ones
            width = 1 << (min(block_size, param.shape[-1]) - 1).bit_length() if folded else 1  # _padded_width
            kind = (folded, grad.dtype, param.dtype, exp_avg.dtype, step, _vector_aligned(tensors, folded), width)
            shared.setdefault(param.device, {}).setdefault(kind, []).append(tensors)
        else:
            own.setdefault(param.device, []).append((tensors, step, folded))
    for device in dict.fromkeys([*own, *shared]):
        with _current_device(device):
            for tensors, step, folded in own.get(device, ()):
                (_launch_folded if folded else _launch_unfolded)(tensors, step, hyper)
            for (folded, _, _, _, step, aligned, _), members in shared.get(device, {}).items():
                _launch_shared(members, folded, step, aligned, hyper)


def _current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as CUDA's current device while its kernels launch (Triton launches on the current device, and
    its stream); nothing to set for CPU tensors (Triton's interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ of two ints, in plain Python (``triton.cdiv`` is a Triton function: ~1.4 us a call from Python)."""
    return -(-a // b)


def _kernel_scalars(step: float, folded: bool, hyper: dict) -> dict:
    """The runtime scalars every kernel takes at step count ``step``: :func:`foam_hf.step_scalars.step_constants`
    in the fused form, torch.lerp's weight, and the keys of the rounding hash, one per salt (:data:`_SALTS`: the two
    moments' and the weights'; a kernel that stores its weights to nearest ignores the last). Computed once per step
    count and kind within one call of the step (``hyper["memo"]``, where present): the same for all its tensors."""
    memo, key = hyper.get("memo", {}), ("scalars", step, folded)
    if key in memo:
        return memo[key]
    constants = step_constants(
        step, lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"], weight_decay=hyper["weight_decay"]
    )
    eps_bc2, step_c = constants.fused(hyper["eps"], hyper["scale"] if folded else 1.0)
    key_m, key_v, key_w = (_signed32((int(step) * _HASH_STEP + salt * _HASH_SALT) & _MASK32) for salt in _SALTS)
    memo[key] = dict(
        decay=constants.decay,
        lerp_weight=1.0 - hyper["beta1"],
        beta2=hyper["beta2"],
        one_minus_beta2=1.0 - hyper["beta2"],
        eps_bc2=eps_bc2,
        step_c=step_c,
        key_m=key_m,
        key_v=key_v,
        key_w=key_w,
    )
    return memo[key]


def _signed32(bits: int) -> int:
    """The signed 32-bit int of the 32 bits ``bits`` (0 <= bits < 2**32): how the keys of the rounding hash are
    passed, so that Triton gives every step's key the same int32 type (see :data:`_STEP_KEYS`)."""
    return bits - (1 << 32) if bits >= 1 << 31 else bits


def _common_constexprs(param: torch.Tensor, exp_avg: torch.Tensor, hyper: dict) -> dict:
    """The compile-time choices of every kernel: torch.lerp's branch, the weights' and the moments' storage, and
    whether bf16 weights are stored stochastically rounded (``weight_rounding="stochastic"``; never for other
    dtypes, whose kernels are then the ones ``"nearest"`` compiles)."""
    out_bf16 = param.dtype == torch.bfloat16
    return dict(
        SMALL_WEIGHT=abs(1.0 - hyper["beta1"]) < 0.5,
        OUT_BF16=out_bf16,
        STATE_BF16=exp_avg.dtype == torch.bfloat16,
        STOCHASTIC_WEIGHTS=out_bf16 and hyper["weight_rounding"] == "stochastic",
    )


def _fold_constexprs(param: torch.Tensor, exp_avg: torch.Tensor, hyper: dict) -> dict:
    """The compile-time choices of the folded kernels: block size, tile, second moment, and the common ones
    (once per tile width and dtypes within one call of the step, ``hyper["memo"]``, where present)."""
    padded = _padded_width(param, hyper["block_size"])
    memo, key = hyper.get("memo", {}), ("fold", padded, param.dtype, exp_avg.dtype)
    if key not in memo:
        memo[key] = dict(
            B=hyper["block_size"],
            BP=padded,
            KB=max(1, _TILE // padded),
            MEAN_SQ=hyper["second_moment"] == "mean_sq",
            **_common_constexprs(param, exp_avg, hyper),
        )
    return memo[key]


def _padded_width(param: torch.Tensor, block_size: int) -> int:
    """The lanes of a folded tensor's tile row: its :func:`block_width` rounded up to a power of two (``BP``)."""
    return 1 << (block_width(param, block_size) - 1).bit_length()


def _adamw_constexprs(param: torch.Tensor, exp_avg: torch.Tensor, hyper: dict) -> dict:
    """The compile-time choices of the AdamW kernels: the span, and the common ones."""
    return dict(BLOCK=_ADAMW_BLOCK, **_common_constexprs(param, exp_avg, hyper))


def _launch_folded(tensors: tuple[torch.Tensor, ...], step: float, hyper: dict) -> None:
    """One launch for one folded tensor: program (r, t) steps tile t of row r. A tensor this grid cannot cover goes
    to the shared kernel instead, whose programs loop over their tiles with int64 indices (the same per-tile code, so
    the same bits): a row of more tiles than a CUDA grid's second dimension holds (:data:`_MAX_GRID_Y`: rows of over
    ~134M entries at B=4), columns past int32 (:data:`_MAX_INT32_COLUMN`: rows of over 2**31 entries, reachable
    within that grid by blocks wider than a tile), or more rows than its first dimension (:data:`_MAX_GRID_X`)."""
    grad, param, exp_avg, exp_avg_sq = tensors
    n = param.shape[-1]
    constexprs = _fold_constexprs(param, exp_avg, hyper)
    num_blocks = _cdiv(n, hyper["block_size"])
    grid = (param.numel() // n, _cdiv(num_blocks, constexprs["KB"]))
    last_column = grid[1] * constexprs["KB"] * hyper["block_size"] + constexprs["BP"]  # past any the tiles index
    if grid[0] > _MAX_GRID_X or grid[1] > _MAX_GRID_Y or last_column > _MAX_INT32_COLUMN:
        _launch_shared([tensors], True, step, _vector_aligned(tensors, True), hyper)
        return
    rho = hyper["res_scale"]
    _foam_fold_kernel[grid](
        grad, param, exp_avg, exp_avg_sq, n, num_blocks, rho=rho, rho2=rho * rho,
        **_kernel_scalars(step, True, hyper), **constexprs, **_LAUNCH_OPTIONS, num_warps=_fold_warps(constexprs),
    )  # fmt: skip


def _launch_unfolded(tensors: tuple[torch.Tensor, ...], step: float, hyper: dict) -> None:
    """One launch for one unfolded tensor (1-D, or B = 1): AdamW's update, ``_ADAMW_BLOCK`` entries a program."""
    grad, param, exp_avg, exp_avg_sq = tensors
    grid = (_cdiv(param.numel(), _ADAMW_BLOCK),)
    _adamw_kernel[grid](
        grad, param, exp_avg, exp_avg_sq, param.numel(), **_kernel_scalars(step, False, hyper),
        **_adamw_constexprs(param, exp_avg, hyper), **_LAUNCH_OPTIONS,
    )  # fmt: skip


def _vector_aligned(tensors: tuple[torch.Tensor, ...], folded: bool) -> bool:
    """Whether a shared kernel may promise the compiler what a launch of its own would prove from its arguments,
    so that it loads and stores 16 bytes at a time: G, W and both moments start on 16-byte boundaries, and the
    row length (folded) or the entry count (unfolded) is a multiple of 16. A false promise would be a wrong
    step, so every tensor of a launch that makes it must hold it."""
    grad, param, exp_avg, exp_avg_sq = tensors
    length = param.shape[-1] if folded else param.numel()
    return (
        length % 16 == 0
        and grad.data_ptr() % 16 == 0
        and param.data_ptr() % 16 == 0
        and exp_avg.data_ptr() % 16 == 0
        and exp_avg_sq.data_ptr() % 16 == 0
    )


def _launch_shared(
    members: list[tuple[torch.Tensor, ...]], folded: bool, step: float, aligned: bool, hyper: dict
) -> None:
    """One launch for several tensors of the same kind (folded or not, dtypes of G, W and moments, step count,
    ``aligned``: whether every one is :func:`_vector_aligned`, and the tile width of the folded ones,
    :func:`_padded_width`): row i of an int64 table holds tensor i's addresses and sizes (:data:`_TABLE_COLUMNS`),
    and program (i, p) steps every P-th tile of it from the p-th, P programs a tensor (:data:`_SHARED_PROGRAMS` in
    all, at most a tile's worth each)."""
    _, param, exp_avg, _ = members[0]
    grad_dtype = members[0][0].dtype  # the launch's kind: every member's gradient has it
    rows, most_tiles = [], 1
    block_size = hyper["block_size"]
    constexprs = _fold_constexprs(param, exp_avg, hyper) if folded else _adamw_constexprs(param, exp_avg, hyper)
    for grad, p, m, v in members:
        addresses = [grad.data_ptr(), p.data_ptr(), m.data_ptr(), v.data_ptr()]
        if folded:
            n = p.shape[-1]
            num_blocks = _cdiv(n, block_size)
            rows.append(addresses + [n, num_blocks, p.numel() // n, 0])
            most_tiles = max(most_tiles, p.numel() // n * _cdiv(num_blocks, constexprs["KB"]))
        else:
            rows.append(addresses + [p.numel(), 0, 0, 0])
            most_tiles = max(most_tiles, _cdiv(p.numel(), _ADAMW_BLOCK))
    table = torch.tensor(rows, dtype=torch.int64)
    if param.device.type == "cuda":  # pinned, so the copy does not wait for the work queued before it
        table = table.pin_memory().to(param.device, non_blocking=True)
    grid = (len(members), min(most_tiles, _cdiv(_SHARED_PROGRAMS, len(members))))
    dtypes = dict(
        GRAD_DTYPE=_TL_DTYPES[grad_dtype],
        PARAM_DTYPE=_TL_DTYPES[param.dtype],
        STATE_DTYPE=_TL_DTYPES[exp_avg.dtype],
        ALIGNED=aligned,
    )
    scalars = _kernel_scalars(step, folded, hyper)
    if folded:
        rho = hyper["res_scale"]
        _foam_fold_list_kernel[grid](
            table,
            rho=rho,
            rho2=rho * rho,
            **scalars,
            **dtypes,
            **constexprs,
            **_LAUNCH_OPTIONS,
            num_warps=_fold_warps(constexprs),
        )
    else:
        _adamw_list_kernel[grid](table, **scalars, **dtypes, **constexprs, **_LAUNCH_OPTIONS)
