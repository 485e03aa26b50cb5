"""FOAM with a real DeepSpeed install on CPU: config checks through Trainer, ZeRO stage 0 trains exactly.

ZeRO stages 1-3 with ``ZeroFOAM`` are tested in tests/test_deepspeed_zero.py.

DeepSpeed comes with the ``dev`` extra (``pip install ".[dev]"``, or ``".[deepspeed]"`` alone); without it
this module fails to import rather than skipping. DeepSpeed runs on its CPU accelerator with gloo; ranks are
subprocesses (``tests/_dist_workers/deepspeed_rank.py``) started by torchrun, as users start them.
"""

from __future__ import annotations

import deepspeed  # noqa: F401  (fail loudly, not skip, when the dev extra is incomplete)
import pytest
import torch
from _helpers import DIST_TOLERANCE as TOLERANCE
from _helpers import DIST_WORKERS, launch, torchrun

from foam_hf import FOAM, FoamConfigError

WORKER = str(DIST_WORKERS / "deepspeed_rank.py")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_arguments_accept_zero_and_refuse_offload_that_replaces_foam(stage, tmp_path):
    from transformers import TrainingArguments

    import foam_hf  # noqa: F401  (registers optim="foam")

    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
    args = TrainingArguments(output_dir=str(tmp_path), optim="foam", deepspeed=config, report_to="none")
    assert args.hf_deepspeed_config is not None
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(FoamConfigError, match=r"offload_optimizer.*DeepSpeedCPUAdam"):
        TrainingArguments(output_dir=str(tmp_path), optim="foam", deepspeed=config, report_to="none")


def test_sequence_parallelism_from_accelerate_is_refused_as_the_json_s_is(tmp_path, monkeypatch):
    """DeepSpeed's sequence parallelism also comes from accelerate's ParallelismConfig (sp_size), in
    TrainingArguments or, after ``accelerate launch`` with a config file, in the environment; the DeepSpeed config
    then says nothing of it. FOAM refuses it there as it refuses the config's sequence_parallel_size."""
    from accelerate.parallelism_config import ParallelismConfig
    from transformers import TrainingArguments

    import foam_hf  # noqa: F401  (registers optim="foam")

    monkeypatch.delenv("ACCELERATE_USE_PARALLELISM_CONFIG", raising=False)
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}

    def arguments(**kwargs):
        return TrainingArguments(output_dir=str(tmp_path), optim="foam", report_to="none", **kwargs)

    with pytest.raises(FoamConfigError, match=r"parallelism \(parallelism_config=ParallelismConfig\(sp_size=2"):
        arguments(deepspeed=config, parallelism_config=ParallelismConfig(sp_size=2))
    with pytest.raises(FoamConfigError, match=r"sequence_parallel_size .* partitions over DeepSpeed's sequence-data"):
        arguments(deepspeed={**config, "sequence_parallel_size": 2})
    assert arguments(deepspeed=config, parallelism_config=ParallelismConfig(sp_size=1)).hf_deepspeed_config
    assert arguments(parallelism_config=ParallelismConfig(sp_size=2)).optim == "foam"  # no DeepSpeed: no ZeRO

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "4")
    with pytest.raises(FoamConfigError, match=r"PARALLELISM_CONFIG_SP_SIZE=4 in the environment.*Fix: set sp_size"):
        arguments(deepspeed=config)
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "two")
    with pytest.raises(FoamConfigError, match=r"PARALLELISM_CONFIG_SP_SIZE='two' .* not an integer.*Fix: set it"):
        arguments(deepspeed=config)


def test_engine_zero0_two_ranks_match_one_process_and_zero2_flattens(tmp_path):
    import sys

    sys.path.insert(0, str(DIST_WORKERS))
    from deepspeed_rank import FOAM_KWARGS, batches, make_model

    model = make_model()
    optimizer = FOAM(model.parameters(), **FOAM_KWARGS)
    for x, y in batches():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    result = launch(torchrun(2), tmp_path, "engine", worker=WORKER)
    # ZeRO stage 0: DeepSpeed hands FOAM the real parameters and only all-reduces the gradients.
    stage0 = result["stage0"]
    assert stage0["client_param_shapes"] == [(12, 10), (12,), (3, 12), (3,)]
    assert stage0["exp_avg_shapes"] == [(12, 3), (12,), (3, 3), (3,)]  # folded, block_size=4
    for got, want in zip(stage0["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), atol=TOLERANCE, rtol=0)
    # ZeRO stage 2 with plain FOAM: it gets flat 1-D partitions (how DeepSpeed pads and splits them is its own
    # business) and keeps full AdamW states for them. This is why ZeRO needs ZeroFOAM (what optim="foam" builds).
    stage2 = result["stage2"]
    assert stage2["client_param_shapes"] and all(len(shape) == 1 for shape in stage2["client_param_shapes"])
    assert stage2["exp_avg_shapes"] == stage2["client_param_shapes"]
    # FOAM says so, once, at its first step; on real parameters (stage 0) it says nothing.
    assert stage0["flat_shard_warnings"] == []
    assert len(stage2["flat_shard_warnings"]) == 1 and "foam_hf.zero.ZeroFOAM" in stage2["flat_shard_warnings"][0]


def test_trainer_deepspeed_zero0_matches_plain_trainer(tmp_path):
    plain = launch([], tmp_path / "plain", worker=str(DIST_WORKERS / "trainer_fsdp2.py"))
    result = launch(torchrun(1), tmp_path / "deepspeed", "trainer", worker=WORKER)
    assert result["distributed_type"] == "DEEPSPEED" and result["is_deepspeed_enabled"]
    assert result["optimizer"] == "FOAM"
    assert result["exp_avg"]["model.layers.0.self_attn.q_proj.weight"].shape == (32, 8)
    for name, want in plain["params"].items():
        torch.testing.assert_close(result["params"][name], want, atol=TOLERANCE, rtol=0, msg=name)
    assert result["losses"] == pytest.approx(plain["losses"], abs=1e-5)
