"""Every bad input fails at construction (or at the first step, for what only a step can see), and the
message names the value."""

from __future__ import annotations

import math

import pytest
import torch

import foam_hf
from foam_hf import FOAM, FoamConfigError

# (kwargs, error type, regex the message must match): one row per rule of FOAM.__init__.
FOAM_ERROR_INPUTS = [
    (dict(lr=-1e-3), FoamConfigError, r"lr=-0\.001 is invalid: it must be finite and >= 0"),
    (dict(lr=math.nan), FoamConfigError, r"lr=nan is invalid"),
    (dict(lr=math.inf), FoamConfigError, r"lr=inf is invalid"),
    (dict(lr="1e-3"), TypeError, r"lr='1e-3' has type str"),
    (dict(eps=-1.0), FoamConfigError, r"eps=-1\.0 is invalid"),
    (dict(weight_decay=-0.1), FoamConfigError, r"weight_decay=-0\.1 is invalid"),
    (dict(weight_decay=math.nan), FoamConfigError, r"weight_decay=nan"),
    (dict(betas=(1.0, 0.999)), FoamConfigError, r"betas\[0\]=1\.0 is invalid: it must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), FoamConfigError, r"betas\[1\]=-0\.1"),
    (dict(betas=0.9), TypeError, r"betas=0\.9 must be a pair"),
    (dict(block_size=0), FoamConfigError, r"block_size=0 is invalid: it must be a positive int"),
    (dict(block_size=-4), FoamConfigError, r"block_size=-4"),
    (dict(block_size=4.0), TypeError, r"block_size=4\.0 has type float"),
    (dict(block_size=True), TypeError, r"block_size=True has type bool"),
    (dict(scale=0.0), FoamConfigError, r"scale=0\.0 is invalid: it must be finite and > 0"),
    (dict(scale=-1.0), FoamConfigError, r"scale=-1\.0"),
    (dict(res_scale=-0.5), FoamConfigError, r"res_scale=-0\.5 is invalid: it must be finite and >= 0"),
    (dict(second_moment="mean"), FoamConfigError, r"second_moment='mean' is invalid: it must be one of"),
    (dict(foreach="yes"), TypeError, r"foreach='yes'"),
]


@pytest.mark.parametrize(
    "kwargs, error_type, error_regex", FOAM_ERROR_INPUTS, ids=[str(k) for k, _, _ in FOAM_ERROR_INPUTS]
)
def test_bad_hyperparameters_fail_at_construction(kwargs, error_type, error_regex):
    with pytest.raises(error_type, match=error_regex) as info:
        FOAM([torch.randn(2, 4, requires_grad=True)], **kwargs)
    assert "Fix:" in str(info.value)


def test_bad_value_in_one_param_group_names_the_group():
    good, bad = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    with pytest.raises(FoamConfigError, match=r"block_size=0 .* \(in param group 1\)"):
        FOAM([{"params": [good]}, {"params": [bad], "block_size": 0}])


def test_misspelled_group_option_is_not_ignored():
    with pytest.raises(FoamConfigError, match=r"\['level'\] are not FOAM options"):
        FOAM([{"params": [torch.randn(2, 4, requires_grad=True)], "level": 2}])


def test_complex_and_integer_parameters_are_refused():
    with pytest.raises(TypeError, match="complex parameter of shape"):
        FOAM([torch.randn(2, 4, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        FOAM([torch.zeros(2, 4, dtype=torch.long)])


def test_sparse_gradient_is_refused_at_step():
    embedding = torch.nn.Embedding(10, 8, sparse=True)
    opt = FOAM(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_empty_parameter_list_is_torchs_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        FOAM([])


def test_every_public_symbol_is_documented():
    for name in foam_hf.__all__:
        assert getattr(foam_hf, name).__doc__, f"foam_hf.{name} has no docstring"
