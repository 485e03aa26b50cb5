"""The demo end to end in a short mode: its Trainer runs, their state bytes, their FOAM grouping, the corpus."""

from __future__ import annotations

import csv
import json
import math
import sysconfig
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from foam_hf.tools.cli import main
from foam_hf.tools.demo_training import RunConfig, build_model, build_trainer, load_corpus, unwrap_optimizer

BLOCK_SIZE = 8
# Tiny budget: the point is the plumbing (Trainer runs, table, files), not the loss.
SHORT = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def folded_weight_names(model: torch.nn.Module) -> set[str]:
    """Written here from the rule, not with foam_hf: the weights of linear layers other than the output head."""
    return {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
    }


def expected_bytes(model: torch.nn.Module, block_size: int) -> tuple[int, int]:
    """From the maths: fp32 moments (2 x 4 bytes per entry) + a 4-byte step per tensor; a folded ``m x n``
    weight keeps ``m * ceil(n / B)`` entries, everything else ``numel``."""
    folded = folded_weight_names(model)
    adamw = sum(8 * p.numel() + 4 for p in model.parameters())
    foam = 0
    for name, p in model.named_parameters():
        entries = (p.numel() // p.shape[-1]) * math.ceil(p.shape[-1] / block_size) if name in folded else p.numel()
        foam += 8 * entries + 4
    return adamw, foam


def groups_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[int, float, list[str]]]:
    """Each param group as (block_size, weight_decay, sorted parameter names), in a canonical order."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        (g["block_size"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups
    ]
    return sorted(groups)


def test_demo_short_mode_writes_outputs_with_true_state_bytes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *SHORT, "--block-size", str(BLOCK_SIZE), "--output-dir", str(out)]) == 0

    for name in ("loss.png", "results.json", "results.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["optim"] for r in runs] in (["adamw_torch_fused", "foam"], ["adamw_torch", "foam"])
    assert runs[1]["optim_args"] == f"block_size={BLOCK_SIZE}"
    assert all(len(r["train_losses"]) == 3 and math.isfinite(r["eval_loss"]) for r in runs)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["state_bytes"]) for r in rows] == [r["state_bytes"] for r in runs]
    printed = capsys.readouterr().out
    assert "| AdamW |" in printed and "transformers.Trainer" in printed and "optim='foam'" in printed
    assert "optim='foam'" in results["meta"]["training_path"]

    # Independent check: the demo's model, its states counted from the parameter shapes.
    expected_adamw, expected_foam = expected_bytes(build_model("tiny", seed=0, seq_len=32), BLOCK_SIZE)
    assert runs[0]["state_bytes"] == expected_adamw
    assert runs[1]["state_bytes"] == expected_foam
    assert runs[1]["adamw_state_bytes"] == expected_adamw
    assert expected_foam < expected_adamw
    # The groups it trained with: every linear weight but the head folded by B, the rest at 1.
    model = build_model("tiny", seed=0, seq_len=32)
    folded = folded_weight_names(model)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    by_block = {}
    for g in runs[1]["groups"]:
        by_block[g["block_size"]] = by_block.get(g["block_size"], 0) + g["params"]
    folded_numel = sum(numel[n] for n in folded)
    assert by_block == {BLOCK_SIZE: folded_numel, 1: sum(numel.values()) - folded_numel}


def test_demo_without_its_extra_stops_before_training(tmp_path, capsys, monkeypatch):
    # matplotlib draws the plot after both runs: without it the demo once trained for minutes, then failed.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    out = tmp_path / "demo"
    assert main(["demo", *SHORT, "--output-dir", str(out)]) == 2
    assert "needs matplotlib (its 'demo' extra)" in capsys.readouterr().err
    assert not out.exists()


def test_demo_builds_foam_exactly_as_optim_foam_does():
    """One folding rule: the demo's Trainer and a user's ``TrainingArguments(optim="foam")`` build the same groups."""
    from transformers import Trainer, TrainingArguments

    config = RunConfig(steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, device="cpu")
    corpus = load_corpus()
    demo_model = build_model("tiny", seed=0, seq_len=32)
    demo = build_trainer(demo_model, corpus, config, optim="foam", optim_args=f"block_size={BLOCK_SIZE}", lr=1e-3)
    demo.create_optimizer()

    user_model = build_model("tiny", seed=0, seq_len=32)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, optim="foam", optim_args=f"block_size={BLOCK_SIZE}", use_cpu=True, report_to=[]
        )
        user = Trainer(model=user_model, args=args)
        user.create_optimizer()

    demo_groups = groups_by_name(unwrap_optimizer(demo.optimizer), demo_model)
    assert demo_groups == groups_by_name(unwrap_optimizer(user.optimizer), user_model)
    folded = {n for b, _, names in demo_groups if b == BLOCK_SIZE for n in names}
    assert folded == folded_weight_names(demo_model)  # and both follow the rule written out above
    assert {n for b, _, names in demo_groups if b == 1 for n in names} == {
        n for n, _ in demo_model.named_parameters()
    } - folded


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


def test_old_pretrain_module_forwards_with_a_deprecation_warning():
    import foam_hf.pretrain
    import foam_hf.tools.demo_training

    with pytest.warns(DeprecationWarning, match="foam_hf.tools.demo_training.load_corpus"):
        assert foam_hf.pretrain.load_corpus is foam_hf.tools.demo_training.load_corpus
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="benchmarks/_engine.py"):
            foam_hf.pretrain.train  # noqa: B018
