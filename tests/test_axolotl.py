"""axolotl's real CLI with ``plugins: [foam_hf.integration.axolotl.FoamPlugin]`` and ``optimizer: foam``.

axolotl is not a foam-hf dependency and pins its own transformers/trl/peft, so this file runs only where axolotl
is installed (the commands and versions that were run are in docs/usage.md, "axolotl"). Tiny local model and
data, offline, CPU. What is checked is independent of foam-hf's reporting: the optimizer state axolotl saved
(moment shapes computed here from the model's shapes and the block size), and that a bad option stops the run
before any checkpoint exists."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import run_process_tree

pytest.importorskip(
    "axolotl", reason="axolotl is not installed here (not a foam-hf dependency; see docs/usage.md, 'axolotl')"
)

AXOLOTL = Path(sys.executable).parent / "axolotl"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "ACCELERATE_USE_CPU": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from hf_fixtures import save_tiny_llama_and_text

    root = tmp_path_factory.mktemp("axolotl")
    return root, save_tiny_llama_and_text(root / "model", root / "text.jsonl")


def write_config(root: Path, out: Path, optim_args: dict) -> Path:
    config = {
        "base_model": str(root / "model"),
        "plugins": ["foam_hf.integration.axolotl.FoamPlugin"],
        "datasets": [{"path": str(root / "text.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(out / "prepared"),
        "val_set_size": 0,
        "output_dir": str(out),
        "sequence_len": 128,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 3,
        "learning_rate": 0.001,
        "lr_scheduler": "constant",
        "optimizer": "foam",
        "optim_args": optim_args,
        "save_steps": 3,
        "logging_steps": 1,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "sdp_attention": False,
        "dataloader_num_workers": 0,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def axolotl_train(config: Path) -> subprocess.CompletedProcess:
    return run_process_tree([str(AXOLOTL), "train", str(config)], env=ENV, timeout=900)


def test_axolotl_train_with_the_plugin_trains_with_folded_moments(assets, tmp_path):
    root, shapes = assets
    out = tmp_path / "out"
    result = axolotl_train(write_config(root, out, {"block_size": 8}))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = {k for entry in state["log_history"] for k in entry}
    assert {"foam/state_bytes", "foam/adamw_state_bytes"} <= logged, sorted(logged)
    saved = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {g["block_size"] for g in saved["param_groups"]} == {8, 1}  # 1: embeddings, head and norms
    folded_moments = sorted(
        list(saved["state"][i]["exp_avg"].shape)
        for g in saved["param_groups"]
        if g["block_size"] == 8
        for i in g["params"]
    )
    expected = sorted(
        [*shape[:-1], math.ceil(shape[-1] / 8)] for n, shape in shapes.items() if n.endswith("_proj.weight")
    )
    assert folded_moments == expected


def test_a_bad_optim_arg_stops_axolotl_before_training(assets, tmp_path):
    root, _ = assets
    out = tmp_path / "out"
    result = axolotl_train(write_config(root, out, {"block_size": 0}))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "block_size=0 is invalid" in output and "Fix:" in output
    assert not list(out.glob("checkpoint-*"))
