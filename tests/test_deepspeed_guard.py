"""DeepSpeed ZeRO configs are refused with a pointer to FSDP2; stage 0 and no DeepSpeed pass."""

from __future__ import annotations

import json

import pytest

from foam_hf import FoamConfigError
from foam_hf.distributed import check_deepspeed_config


@pytest.mark.parametrize("stage", [1, 2, 3, "auto"])
def test_zero_stages_are_refused(stage, tmp_path):
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for given in (config, str(path)):
        with pytest.raises(FoamConfigError, match=rf"stage={stage!r}.*flat 1-D partitions.*FSDP2"):
            check_deepspeed_config(given)


@pytest.mark.parametrize("config", [None, {}, {"zero_optimization": {"stage": 0}}])
def test_no_zero_passes(config):
    assert check_deepspeed_config(config) is None


def test_wrong_type_is_named():
    with pytest.raises(TypeError, match="got list"):
        check_deepspeed_config([1])
