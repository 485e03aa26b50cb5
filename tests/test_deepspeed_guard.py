"""DeepSpeed configs: every ZeRO stage passes; the settings FOAM cannot run under exactly are refused.

The full table of refused settings is in tests/test_zero.py; this file keeps the entry point the Trainer
integration calls (``foam_hf.distributed.check_deepspeed_config``) and its JSON-path form.
"""

from __future__ import annotations

import json
import re

import pytest

from foam_hf import FoamConfigError
from foam_hf.distributed import check_deepspeed_config
from foam_hf.zero import zero_stage


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


@pytest.mark.parametrize(
    "zero, stage",
    [
        # "auto" numbers are DeepSpeed's defaults (it drops "auto" values): no hpZ, no MiCS.
        ({"stage": 3, "zero_hpz_partition_size": "auto"}, 3),
        ({"stage": 2, "mics_shard_size": "auto"}, 2),
        ({"stage": 2, "elastic_checkpoint": "auto"}, 2),
        # What DeepSpeed's config model coerces: "2" and 2.0 are stage 2, the deprecated `true` form is stage 1.
        ({"stage": "2"}, 2),
        ({"stage": 2.0}, 2),
        (True, 1),
        # ZeRO++ quantized weights and gradients (qwZ, qgZ) keep the partitioning ZeroFOAM knows.
        ({"stage": 3, "zero_quantized_weights": True, "zero_quantized_gradients": True}, 3),
    ],
)
def test_settings_are_read_as_deepspeed_reads_them(zero, stage):
    config = {"zero_optimization": zero}
    assert check_deepspeed_config(config) is None
    assert zero_stage(config) == stage


@pytest.mark.parametrize("stage", [4, -1, None, 2.5, "two", [2]])
def test_a_stage_deepspeed_does_not_run_is_named(stage):
    with pytest.raises(FoamConfigError, match=rf"stage={re.escape(repr(stage))} .*0, 1, 2 or 3.*Fix: set \"stage\""):
        check_deepspeed_config({"zero_optimization": {"stage": stage}})


def test_a_setting_that_is_not_a_number_is_named():
    config = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": "two"}}
    with pytest.raises(FoamConfigError, match=r"zero_hpz_partition_size='two' is not an integer.*Fix: "):
        check_deepspeed_config(config)


@pytest.mark.parametrize("value", [False, 0, None])
def test_any_false_value_turns_the_cpu_optimizer_swap_off(value):
    # DeepSpeed and accelerate test the value's truth, so 0 and null turn it off as false does.
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert check_deepspeed_config({**config, "zero_force_ds_cpu_optimizer": value}) is None


def test_offload_refusal_tells_accelerate_yaml_users_to_use_a_json_file():
    # accelerate's `deepspeed_config: {zero_stage: 2, offload_optimizer_device: cpu}` has no field for the key.
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(FoamConfigError, match=r"Fix: .*zero_force_ds_cpu_optimizer.*JSON file.*deepspeed_config_file"):
        check_deepspeed_config(config)
