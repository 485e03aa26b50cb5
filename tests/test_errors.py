"""Every bad input fails at construction (or at the first step, for what only a step can see), and the
message names the value, the rule and the fix.

The inputs and the messages they must produce are one catalogue, in tests/_helpers.py; this module runs it.
Bad inputs that need a model or a Trainer (overrides, the command line, Trainer set-up) are in
tests/test_bad_inputs.py.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    CONFIG_ERRORS,
    FOAM_ERROR_INPUTS,
    OPTIM_ARGS_ERRORS,
    PARAM_ERROR_INPUTS,
    TRAINING_ARGS_ERRORS,
    assert_fragments,
    fused_kernel_builds,
    leaf,
)
from hf_fixtures import training_args

import foam_hf
from foam_hf import FOAM, FoamConfig, FoamConfigError
from foam_hf.options import GROUP_DEFAULTS


@pytest.mark.parametrize(
    "kwargs, error, fragments", [r[1:] for r in FOAM_ERROR_INPUTS], ids=[r[0] for r in FOAM_ERROR_INPUTS]
)
def test_bad_hyperparameter_is_refused_at_construction(kwargs, error, fragments):
    with pytest.raises(error) as info:
        FOAM([leaf(2, 4)], **kwargs)
    assert_fragments(str(info.value), [*fragments, "Fix:"])


# The catalogue's rows that the functional step can take: its options but state_dtype, betas as two numbers.
FUNCTIONAL_ERROR_INPUTS = [
    r
    for r in FOAM_ERROR_INPUTS
    if "state_dtype" not in r[1] and isinstance(r[1].get("betas", ()), tuple) and len(r[1].get("betas", ())) in (0, 2)
]


@pytest.mark.parametrize(
    "kwargs, error, fragments", [r[1:] for r in FUNCTIONAL_ERROR_INPUTS], ids=[r[0] for r in FUNCTIONAL_ERROR_INPUTS]
)
def test_bad_hyperparameter_is_refused_by_the_functional_step(kwargs, error, fragments):
    """foam_hf.foam checks what FOAM checks, before it touches a tensor (it once ran sq_mean for any
    misspelled second_moment, and AdamW for block_size <= 0)."""
    options = {k: v for k, v in GROUP_DEFAULTS.items() if k not in ("betas", "state_dtype")}
    beta1, beta2 = kwargs.get("betas", GROUP_DEFAULTS["betas"])
    options |= {k: v for k, v in kwargs.items() if k != "betas"} | {"beta1": beta1, "beta2": beta2}
    param = torch.ones(2, 8)
    exp_avg, exp_avg_sq = torch.zeros(2, 2), torch.zeros(2, 2)
    with pytest.raises(error) as info:
        foam_hf.foam([param], [torch.ones(2, 8)], [exp_avg], [exp_avg_sq], [torch.tensor(0.0)], **options)
    assert_fragments(str(info.value), [*fragments, "Fix:", "in foam_hf.foam"])
    assert torch.equal(param, torch.ones(2, 8)) and not exp_avg.any() and not exp_avg_sq.any()


@pytest.mark.parametrize(
    "build, error, fragments", [r[1:] for r in PARAM_ERROR_INPUTS], ids=[r[0] for r in PARAM_ERROR_INPUTS]
)
def test_bad_parameter_list_is_refused(request, build, error, fragments):
    if "fused=True" in request.node.callspec.id and not fused_kernel_builds():
        error, fragments = RuntimeError, ["fused=True"]  # without a kernel the same call fails on the build
    with pytest.raises(error) as info:
        build()
    assert_fragments(str(info.value), fragments)


@pytest.mark.parametrize("entry", ["FoamConfig.from_optim_args", "TrainingArguments"])
@pytest.mark.parametrize("optim_args, error, fragments", OPTIM_ARGS_ERRORS, ids=[str(r[0]) for r in OPTIM_ARGS_ERRORS])
def test_bad_optim_args_are_refused_where_they_enter(tmp_path, entry, optim_args, error, fragments):
    # The same message whether the string is parsed on its own or when TrainingArguments is built (before any
    # model or Trainer exists).
    with pytest.raises(error) as info:
        if entry == "TrainingArguments":
            training_args(tmp_path, optim_args=optim_args)
        else:
            FoamConfig.from_optim_args(optim_args)
    assert_fragments(str(info.value), fragments)


# A writer that loses the targets, and one that writes what the parser refuses, with what the error then says.
LOSSY_WRITERS = [
    ("block_size=8", "reads back as FoamConfig(block_size=8"),
    ("block_size=8,target_modules=q_proj:8", "does not read back (optim_args: target_modules entry 'q_proj:8'"),
]


@pytest.mark.parametrize("written, why", LOSSY_WRITERS, ids=["lossy", "unreadable"])
def test_a_config_whose_optim_args_string_does_not_read_back_is_refused(tmp_path, monkeypatch, written, why):
    # A FoamConfig or a mapping reaches transformers only as to_optim_args(); a value lost on the way would change
    # the run silently.
    monkeypatch.setattr(FoamConfig, "to_optim_args", lambda self: written)
    for optim_args in (
        FoamConfig(block_size=8, target_modules=["q_proj"]),
        {"block_size": 8, "target_modules": ["q_proj"]},
    ):
        with pytest.raises(FoamConfigError) as info:
            training_args(tmp_path, optim_args=optim_args)
        assert_fragments(str(info.value), ["is written as the string", repr(written), why, "Fix: pass optim_args"])


@pytest.mark.parametrize("build, error, fragments", [r[1:] for r in CONFIG_ERRORS], ids=[r[0] for r in CONFIG_ERRORS])
def test_bad_typed_config(build, error, fragments):
    with pytest.raises(error) as info:
        build()
    assert_fragments(str(info.value), fragments)


@pytest.mark.parametrize(
    "fields, fragments", [r[1:] for r in TRAINING_ARGS_ERRORS], ids=[r[0] for r in TRAINING_ARGS_ERRORS]
)
def test_training_arguments_fields_fail_when_built_under_their_own_names(tmp_path, fields, fragments):
    with pytest.raises(FoamConfigError) as info:
        training_args(tmp_path, **fields)
    assert_fragments(str(info.value), fragments)


def test_fsdp2_from_the_arguments_is_taken_whatever_accelerate_left_in_the_environment(tmp_path, monkeypatch):
    """accelerate sets ACCELERATE_USE_FSDP in the process when the Trainer builds its FSDP2 plugin; arguments built
    afterwards (a resume in the same process) ask for FSDP2 through fsdp_config, which is what the Trainer uses."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    args = training_args(tmp_path, fsdp=True, fsdp_config={"version": 2})
    assert args.optim == "foam" and args.fsdp_config["version"] == 2


@pytest.mark.parametrize("version, refused", [("1", True), (None, True), ("2", False)])
def test_accelerate_launch_with_fsdp1_is_refused_when_the_arguments_are_built(tmp_path, monkeypatch, version, refused):
    """accelerate launch with an FSDP config sets these variables (FSDP_VERSION defaults to 1 there, also when it is
    unset); FSDP1's flat shards never fold, so optim="foam" refuses it, saying what the environment holds, and
    takes FSDP2."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if version is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    else:
        monkeypatch.setenv("FSDP_VERSION", version)
    if not refused:
        assert training_args(tmp_path).optim == "foam"
        return
    with pytest.raises(FoamConfigError) as info:
        training_args(tmp_path)
    said = "FSDP_VERSION=1" if version else "FSDP_VERSION unset, which accelerate reads as 1"
    assert_fragments(str(info.value), ["ACCELERATE_USE_FSDP=true", said, "never fold", "fsdp_version: 2"])


def test_sparse_gradient_is_refused_at_step():
    embedding = torch.nn.Embedding(10, 8, sparse=True)
    opt = FOAM(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_every_public_symbol_is_documented():
    for name in foam_hf.__all__:
        assert getattr(foam_hf, name).__doc__, f"foam_hf.{name} has no docstring"


def test_foam_layerwise_under_accelerates_fp16_is_refused(tmp_path, monkeypatch):
    # accelerate launch --mixed_precision fp16 sets ACCELERATE_MIXED_PRECISION, which TrainingArguments reads into
    # mixed_precision while fp16 stays False: the refusal of loss-scaled gradients checked only fp16.
    from hf_fixtures import training_args

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(FoamConfigError, match=r"mixed precision fp16 from accelerate.*Fix: use bf16"):
        training_args(tmp_path, optim="foam_layerwise", max_grad_norm=0.0)
