"""The demo end to end in a short mode, its reported state bytes, and the corpus split."""

from __future__ import annotations

import csv
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from foam_hf import FOAM, state_memory
from foam_hf.cli import main
from foam_hf.pretrain import OptimizerSpec, build_model, build_optimizer, load_corpus

BLOCK_SIZE = 8
# Tiny budget: the point is the plumbing (spawned runs, table, files), not the loss.
SHORT = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def _expected_bytes(model: torch.nn.Module, block_size: int) -> tuple[int, int]:
    """From the maths: fp32 moments (2 x 4 bytes per entry) + a 4-byte step per tensor; linear weights
    other than lm_head keep ``rows * ceil(n / B)`` entries, everything else ``numel``."""
    folded_ids = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }
    adamw = sum(8 * p.numel() + 4 for p in model.parameters())
    foam = sum(
        8 * (p.numel() // p.shape[-1]) * math.ceil(p.shape[-1] / block_size) + 4
        if id(p) in folded_ids
        else 8 * p.numel() + 4
        for p in model.parameters()
    )
    return adamw, foam


def _actual_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())


def test_demo_short_mode_writes_outputs_with_true_state_bytes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *SHORT, "--block-size", str(BLOCK_SIZE), "--output-dir", str(out)]) == 0

    for name in ("loss.png", "results.json", "results.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["kind"] for r in runs] == ["adamw", "foam"]
    assert all(len(r["train_losses"]) == 3 and math.isfinite(r["eval_loss"]) for r in runs)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["state_bytes"]) for r in rows] == [r["state_bytes"] for r in runs]
    assert "| AdamW |" in capsys.readouterr().out

    # Independent check: rebuild the same model and optimizers here, take one step, count the states.
    model = build_model("tiny", seed=0, seq_len=32)
    expected_adamw, expected_foam = _expected_bytes(model, BLOCK_SIZE)
    x = torch.randint(0, 256, (2, 32))
    held = {}
    for spec in (OptimizerSpec("a", "adamw", 1e-3), OptimizerSpec("f", "foam", 1e-3, block_size=BLOCK_SIZE)):
        opt = build_optimizer(spec, model)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        held[spec.kind] = opt
    assert isinstance(held["foam"], FOAM)
    assert _actual_state_bytes(held["adamw"]) == expected_adamw == runs[0]["state_bytes"]
    assert _actual_state_bytes(held["foam"]) == expected_foam == runs[1]["state_bytes"]
    assert state_memory(held["foam"]).foam_bytes == expected_foam
    assert runs[1]["adamw_state_bytes"] == expected_adamw
    assert expected_foam < expected_adamw


def test_corpus_holds_out_whole_files():
    corpus = load_corpus()
    assert corpus.source == "stdlib"
    assert corpus.eval_files and corpus.train_files
    assert not set(corpus.eval_files) & set(corpus.train_files)
    # The split is by file: a held-out file's text does not occur in the training stream.
    train_bytes = corpus.train.numpy().tobytes()
    for name in corpus.eval_files[:3]:
        text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_bytes()
        assert text[:2000] not in train_bytes
        assert text[:2000] in corpus.eval.numpy().tobytes()


def test_corpus_falls_back_to_generated_text_when_sources_are_missing(tmp_path):
    with pytest.warns(RuntimeWarning, match="generated in-process"):
        corpus = load_corpus(stdlib_dir=tmp_path)
    assert corpus.source == "generated"
    assert corpus.train.numel() > 10_000 and corpus.eval.numel() > 1_000
