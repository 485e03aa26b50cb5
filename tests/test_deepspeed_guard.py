"""DeepSpeed configs: every ZeRO stage passes; the settings FOAM cannot run under exactly are refused.

The full table of refused settings is in tests/test_zero.py; this file keeps the entry point the Trainer
integration calls (``foam_hf.distributed.check_deepspeed_config``) and its JSON-path form.
"""

from __future__ import annotations

import json

import pytest

from foam_hf import FoamConfigError
from foam_hf.distributed import check_deepspeed_config


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "auto"])
def test_zero_stages_pass(stage, tmp_path):
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for given in (config, str(path)):
        assert check_deepspeed_config(given) is None


def test_offload_that_would_replace_foam_is_refused(tmp_path):
    config = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for given in (config, str(path)):
        with pytest.raises(FoamConfigError, match=r"DeepSpeedCPUAdam.*Fix: set \"zero_force_ds_cpu_optimizer\": false"):
            check_deepspeed_config(given)
    config["zero_force_ds_cpu_optimizer"] = False
    assert check_deepspeed_config(config) is None


@pytest.mark.parametrize("config", [None, {}, {"zero_optimization": {"stage": 0}}])
def test_no_zero_passes(config):
    assert check_deepspeed_config(config) is None


def test_wrong_type_is_named():
    with pytest.raises(TypeError, match="got list"):
        check_deepspeed_config([1])
