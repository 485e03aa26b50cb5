"""The memory calculator against real optimizers on a real tiny model, and against shapes counted by hand."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.optimization import Adafactor

from foam_hf import FOAM, FoamConfig, FoamConfigError, NoMatchingModuleError
from foam_hf.param_groups import resolve_block_sizes
from foam_hf.tools.cli import _add_memory as add_memory_parser
from foam_hf.tools.memory_report import memory_report

# hidden 32, intermediate 40: down_proj rows have n=40, ragged for B in {3, 16, 32}; B=64 exceeds every row.
BLOCK_SIZES = (2, 3, 4, 16, 64)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=48,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_config().save_pretrained(folder)
    return str(folder / "config.json")


@pytest.fixture(scope="module")
def report(config_path):
    return memory_report(config_path, compared_block_sizes=BLOCK_SIZES, rank=8)


def _real_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 48, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def _held_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds in its state, read off the real states."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _groups_by_hand(model: torch.nn.Module, block_of) -> list[dict]:
    """One FOAM param group per block size, chosen by the test from module types and names."""
    sizes: dict[int, list[torch.Tensor]] = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            sizes.setdefault(block_of(module_name, module, pname), []).append(p)
    return [{"params": ps, "block_size": b} for b, ps in sizes.items()]


def _default_block(block_size: int):
    def block_of(module_name, module, pname):
        linear = isinstance(module, torch.nn.Linear) and module_name != "lm_head"
        return block_size if linear and pname == "weight" else 1

    return block_of


def test_adamw_bytes_equal_a_real_adamw_after_one_step(report):
    model = _real_model()
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    _one_step(model, optimizer)
    assert report.adamw_state == _held_bytes(optimizer)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_foam_bytes_equal_a_real_foam_after_one_step(report, block_size):
    model = _real_model()
    optimizer = FOAM(_groups_by_hand(model, _default_block(block_size)))
    _one_step(model, optimizer)
    assert len(optimizer.state) == sum(1 for _ in model.parameters())  # every tensor got its state
    assert report.foam_state[block_size] == _held_bytes(optimizer)


def test_adafactor_bytes_equal_a_real_adafactor_after_one_step(report):
    for beta1, expected in ((None, report.adafactor_state), (0.9, report.adafactor_beta1_state)):
        model = _real_model()
        optimizer = Adafactor(
            model.parameters(), lr=1e-3, beta1=beta1, relative_step=False, scale_parameter=False, warmup_init=False
        )
        _one_step(model, optimizer)
        assert expected == _held_bytes(optimizer), beta1


def test_parameter_counts_and_categories_by_hand(report):
    h, i, layers, vocab, kv_dim = 32, 40, 2, 48, 2 * (32 // 4)
    attention = layers * (h * h + 2 * h * kv_dim + h * h)
    mlp = layers * 3 * h * i
    norms = (2 * layers + 1) * h
    assert report.categories["attention"]["params"] == attention
    assert report.categories["mlp"]["params"] == mlp
    assert report.categories["norms"]["params"] == norms
    assert report.categories["embeddings"]["params"] == vocab * h
    assert report.categories["lm_head"]["params"] == vocab * h
    assert report.num_params == attention + mlp + norms + 2 * vocab * h
    # Default targets: the 7 linear weights of each layer, never the embeddings or the head.
    assert sum(e.target for e in report.params) == 7 * layers
    assert report.categories["lm_head"]["folded_by_default"] == 0


def test_galore_and_8bit_formulas_by_hand(report):
    h, i, kv_dim, r = 32, 40, 16, 8  # kv_dim = 2 kv heads * head_dim 8
    matrices = [(h, h), (kv_dim, h), (kv_dim, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down
    projected = 2 * sum(4 * (r * min(m, n) + 2 * r * max(m, n)) for m, n in matrices)
    projected_numel = 2 * sum(m * n for m, n in matrices)
    rest = report.num_params - projected_numel
    assert report.galore_state == projected + 8 * rest
    assert report.galore_state_bf16_weights == projected // 2 + 4 * rest  # GaLore keeps bf16 weights' dtype
    assert report.adam8bit_state == 2 * report.num_params


@pytest.mark.parametrize("optimizer_name", ["AdamW", "FOAM B=4", "Adafactor (beta1=None: no first moment)"])
def test_bf16_weight_column_counts_what_each_optimizer_holds_for_bf16_weights(config_path, optimizer_name):
    # torch's AdamW keeps bf16 moments for bf16 weights, FOAM (by default) and transformers' Adafactor fp32 ones:
    # the bf16 column once charged AdamW fp32 moments, overstating FOAM's saving there about threefold.
    result = memory_report(config_path, compared_block_sizes=(4,), rank=8)
    row = {r["optimizer"]: r for r in result.to_dict()["optimizers"]}[optimizer_name]
    model = _real_model().to(torch.bfloat16)
    if optimizer_name == "AdamW":
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    elif optimizer_name == "FOAM B=4":
        optimizer = FOAM(_groups_by_hand(model, _default_block(4)))
    else:
        optimizer = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    _one_step(model, optimizer)
    assert row["state_bytes_bf16_weights"] == _held_bytes(optimizer)
    assert row["training_bytes_bf16"] == 4 * result.num_params + _held_bytes(optimizer)


def test_training_memory_adds_weights_and_grads(report):
    n = report.num_params
    assert report.training_bytes(report.adamw_state, 4) == 8 * n + report.adamw_state
    assert report.training_bytes(report.foam_state[4], 2) == 4 * n + report.foam_state[4]


def test_override_changes_exactly_the_tensors_it_names(config_path):
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    default = resolve_block_sizes(model, FoamConfig(block_size=4)).size_by_parameter
    overridden = resolve_block_sizes(
        model, FoamConfig(block_size=4, block_sizes={"q_proj": 8, "lm_head": 4})
    ).size_by_parameter
    changed = {n for n in default if default[n] != overridden[n]}
    named = {n for n, _ in model.named_parameters() if n.endswith("q_proj.weight") or n == "lm_head.weight"}
    assert changed == named
    assert all(overridden[n] == 8 for n in named if "q_proj" in n) and overridden["lm_head.weight"] == 4

    result = memory_report(
        config_path, compared_block_sizes=(4,), optim_args="block_size=4,block_sizes=q_proj:8;lm_head:4"
    )
    assert set(result.override_changed) == named
    real = _real_model()

    def block_of(module_name, module, pname):
        if module_name.endswith("q_proj") and pname == "weight":
            return 8
        if module_name == "lm_head":
            return 4
        return _default_block(4)(module_name, module, pname)

    optimizer = FOAM(_groups_by_hand(real, block_of))
    _one_step(real, optimizer)
    assert result.override_state == _held_bytes(optimizer)
    assert result.override_default_state == result.foam_state[4]


def test_most_specific_pattern_wins():
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    overrides = {"q_proj": 8, r"layers\.1\.self_attn\.q_proj": 2, "lm_head": 1}
    sizes = resolve_block_sizes(model, FoamConfig(block_size=4, block_sizes=overrides)).size_by_parameter
    assert sizes["model.layers.0.self_attn.q_proj.weight"] == 8
    assert sizes["model.layers.1.self_attn.q_proj.weight"] == 2
    assert sizes["lm_head.weight"] == 1
    assert sizes["model.norm.weight"] == 1  # matched by no pattern, not a default target


def test_override_matching_nothing_raises(config_path):
    with pytest.raises(NoMatchingModuleError, match=r"'qproj' matches no trainable parameter.*\['q_proj'"):
        memory_report(config_path, compared_block_sizes=(4,), optim_args="block_sizes=qproj:8")


def test_bad_model_name_lists_the_valid_names():
    with pytest.raises(FoamConfigError, match=r"MODEL='llama-2b' is neither.*llama-60m.*llama-7b.*gemma-2-2b.*Fix:"):
        memory_report("llama-2b")


@pytest.mark.parametrize(
    "optim_args, regex",
    [
        ("block_size=0", r"block_size=0 is invalid"),
        ("blocksize=4", r"unknown key\(s\) \['blocksize'\].\n'blocksize': did you mean 'block_size'\?\nValid keys:"),
        ("block_sizes=q_proj", r"'q_proj' is not pattern:size"),
        ("block_sizes=q_proj:x", r"block_sizes entry 'q_proj:x': size 'x' is not an int >= 1"),
    ],
)
def test_bad_optim_args_name_the_value(config_path, optim_args, regex):
    with pytest.raises(FoamConfigError, match=regex):
        memory_report(config_path, compared_block_sizes=(4,), optim_args=optim_args)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="foam-hf")
    add_memory_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_json_and_markdown(config_path, capsys):
    args = _parse(["memory", config_path, "--block-sizes", "4,16", "--rank", "8", "--format", "json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {row["optimizer"]: row for row in data["optimizers"]}
    assert set(rows) >= {"AdamW", "FOAM B=4", "FOAM B=16", "GaLore r=8"}
    n = data["num_params"]
    assert rows["AdamW"]["training_bytes_fp32"] == 8 * n + rows["AdamW"]["state_bytes"]
    assert math.isclose(rows["AdamW"]["ratio_vs_adamw"], 1.0)

    args = _parse(["memory", config_path, "--optim-args", "block_sizes=down_proj:16"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| FOAM B=32 |" in out and "### Per-module overrides: `block_sizes=down_proj:16`" in out


def test_cli_bad_model_exits_2_with_the_names(capsys):
    args = _parse(["memory", "no-such-model"])
    assert args.func(args) == 2
    assert "Built-in names: llama-60m" in capsys.readouterr().err


def test_cli_names_what_is_wrong_with_a_model_folder(tmp_path, monkeypatch, capsys):
    # A config transformers' own validation refuses (hidden size not a multiple of the heads) once ended in a
    # traceback; a folder without config.json was called "neither a built-in name nor an existing ... folder".
    bad = tiny_config().to_dict() | {"num_attention_heads": 3}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    args = _parse(["memory", "bad"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "cannot build a config from 'bad/config.json'" in err and "(32) is not a multiple" in err
    assert "Fix: correct that field" in err
    args = _parse(["memory", "empty"])
    assert args.func(args) == 2
    assert "MODEL='empty' is a folder with no config.json in it. Fix: " in capsys.readouterr().err


def test_a_local_folder_wins_over_a_built_in_name(tmp_path, monkeypatch):
    # ./llama-60m/config.json is the user's model: it used to be ignored for the built-in shapes of that name.
    (tmp_path / "llama-60m").mkdir()
    tiny_config().save_pretrained(tmp_path / "llama-60m")
    monkeypatch.chdir(tmp_path)
    assert memory_report("llama-60m", compared_block_sizes=(4,)).num_params == _real_model().num_parameters()
    monkeypatch.chdir(tmp_path / "llama-60m")  # no such folder here: the built-in shapes
    assert memory_report("llama-60m", compared_block_sizes=(4,)).num_params > 50_000_000


def test_builtin_paper_model_counts_by_hand():
    """llama-60m from the GaLore/FOAM config: 512 hidden, 1376 intermediate, 8 layers, vocab 32000."""
    h, i, layers, vocab = 512, 1376, 8, 32000
    result = memory_report("llama-60m", compared_block_sizes=(4,))
    assert result.num_params == 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    folded = layers * (4 * h * math.ceil(h / 4) + 2 * i * math.ceil(h / 4) + h * math.ceil(i / 4))
    steps = 4 * len(result.params)
    assert result.foam_state[4] == 8 * folded + 8 * (result.num_params - layers * (4 * h * h + 3 * h * i)) + steps


def test_pattern_on_a_parent_module_covers_its_linear_weights():
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
    sizes = resolve_block_sizes(
        model, FoamConfig(block_size=4, block_sizes={"self_attn": 16, "o_proj": 2})
    ).size_by_parameter
    for name in sizes:
        if ".self_attn." in name:
            assert sizes[name] == (2 if ".o_proj." in name else 16), name
        elif ".mlp." in name:
            assert sizes[name] == 4, name


def test_console_script_has_the_memory_subcommand(capsys):
    """``foam-hf memory`` as installed: the real entry point's parser, not a test-built one."""
    from foam_hf.tools.cli import main

    assert main(["memory", "llama-60m", "--block-sizes", "4"]) == 0
    out = capsys.readouterr().out
    assert "| AdamW |" in out and "| FOAM B=4 |" in out


def test_a_small_model_reads_in_parameters_and_kib(report):
    # The tiny model has ~20 thousand parameters and ~0.2 MiB of AdamW states: counts are shown in full and
    # small byte counts in KiB, not rounded to "0.0 M" and "0.0 MiB".
    from foam_hf.tools.memory_markdown import format_markdown

    real = _real_model()
    total = sum(p.numel() for p in real.parameters())
    norms = sum(p.numel() for name, p in real.named_parameters() if "norm" in name)
    assert 1_000 < total < 1_000_000
    foam = FOAM(_groups_by_hand(real, _default_block(64)))
    _one_step(real, foam)
    foam_bytes = _held_bytes(foam)
    assert foam_bytes < (1 << 20) // 10  # below 0.1 MiB
    text = format_markdown(report)
    assert f"LlamaForCausalLM, {total:,} parameters," in text
    assert f"| norms | 5 | {norms:,} |" in text  # 2 per layer and the final one
    assert f"| FOAM B=64 | {foam_bytes / 1024:.1f} KiB |" in text
    assert "0.0 M" not in text


def test_state_dtype_in_optim_args_counts_the_bytes_a_real_foam_holds(config_path):
    # bf16 states: 2 bytes per moment entry, for folded and unfolded tensors alike; read off a real FOAM.
    result = memory_report(config_path, compared_block_sizes=(4,), optim_args="block_size=4,state_dtype=bfloat16")
    real = _real_model()
    optimizer = FOAM(_groups_by_hand(real, _default_block(4)), state_dtype="bfloat16")
    _one_step(real, optimizer)
    assert result.override_state == _held_bytes(optimizer)
    assert result.override_state < result.foam_state[4]  # the fp32 comparison rows stay fp32
    assert result.to_dict()["overrides"]["state_dtype"] == "bfloat16"
    from foam_hf.tools.memory_markdown import format_markdown

    text = format_markdown(result)
    assert "bf16 states" in text and "FOAM states (bf16)" in text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_adamw_bytes_are_what_torch_adamw_holds_for_each_parameter_dtype(dtype):
    # torch's AdamW keeps its moments in the parameter's dtype: bf16 moments for bf16 parameters. The figure once
    # assumed fp32 for half parameters (FOAM's default), doubling AdamW's bytes and the logged state ratio.
    from foam_hf import adamw_state_bytes

    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in ((64, 64), (7,))]
    adamw = torch.optim.AdamW(params, foreach=False)
    for p in params:
        p.grad = torch.ones_like(p)
    adamw.step()
    held = sum(t.numel() * t.element_size() for state in adamw.state.values() for t in state.values())
    assert sum(adamw_state_bytes(p) for p in params) == held


def _tiny_mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=48, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip


def _expert_warnings(**kwargs) -> tuple[list[str], object]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = memory_report(_tiny_mixtral_config(), compared_block_sizes=(4,), **kwargs)
    return [str(w.message) for w in caught if "mixture-of-experts" in str(w.message)], result


@pytest.mark.parametrize(
    ("optim_args", "warned"),
    [(None, True), ("block_size=4", True), ("block_sizes=experts:4", False), ("block_sizes=experts:1", False)],
)
def test_the_experts_warning_follows_the_options_the_report_is_for(optim_args, warned):
    """The unfolded-experts warning is the user's plan's: it is given once when that plan leaves the experts with
    AdamW states without being told to, and not at all when optim_args names them (the report's own default plans,
    which it only compares against, stay silent). The bytes are those of a real FOAM built from the same options."""
    from transformers import MixtralForCausalLM

    from foam_hf import foam_param_groups

    messages, result = _expert_warnings(optim_args=optim_args)
    assert len(messages) == (1 if warned else 0), messages
    if optim_args is None:
        return
    import warnings

    torch.manual_seed(0)
    model = MixtralForCausalLM(_tiny_mixtral_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = FOAM(foam_param_groups(model, optim_args), lr=1e-3)
    assert sum("mixture-of-experts" in str(w.message) for w in caught) == len(messages)  # as the real build warns
    _one_step(model, optimizer)
    assert result.override_state == _held_bytes(optimizer)
