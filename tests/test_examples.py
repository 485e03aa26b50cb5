"""Every example of ``examples/`` runs in its short mode, and does what its docstring says.

Each test imports the script by path, calls its ``main([...])`` with ``--short`` (the torchrun example is
launched the way its docstring says, in 2 processes), and checks the result against something computed
independently: the optimizer really is FOAM, the losses are finite, the state bytes equal two moments of
``rows * ceil(n / B)`` entries (4 bytes each) plus a 4-byte step per parameter, worked out in the test from the
parameter shapes and the documented folding rule (tests/_helpers.py), and are below AdamW's; the block sizes
the examples report and print follow the same rule; FSDP2 keeps each rank's rows of a folded moment; and a
resumed run equals an uninterrupted one bit for bit. Every example takes ``--short`` and
``--model-name-or-path``, as docs/usage.md says.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import (
    LAUNCH_TIMEOUT,
    assert_same_state,
    expected_block_sizes,
    expected_state_bytes,
    run_process_tree,
    torchrun,
    worker_env,
)
from hf_fixtures import unwrap_foam

from foam_hf import FOAM, FoamConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALL_EXAMPLES = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (the HfArgumentParser example) look their module up here
    spec.loader.exec_module(module)
    return module


def short_flags(tmp_path, steps: int) -> list[str]:
    return ["--short", "--max-steps", str(steps), "--output-dir", str(tmp_path), "--batch-size", "4"]


def unwrapped(optimizer):
    while not isinstance(optimizer, FOAM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def assert_foam_run(summary, block_size: int, overrides: dict[str, int] | None = None):
    trainer = summary["trainer"]
    assert summary["optimizer"] == "FOAM" and type(unwrapped(trainer.optimizer)) is FOAM
    assert summary["losses"] and all(math.isfinite(x) for x in summary["losses"])
    foam_bytes, adamw_bytes = expected_state_bytes(
        trainer.model, expected_block_sizes(trainer.model, block_size, overrides)
    )
    assert (summary["state_bytes"], summary["adamw_state_bytes"]) == (foam_bytes, adamw_bytes)
    assert summary["state_bytes"] < summary["adamw_state_bytes"]
    # The states really are folded: an exp_avg smaller than its parameter exists.
    optimizer = unwrapped(trainer.optimizer)
    assert any(s["exp_avg"].numel() < p.numel() for p, s in optimizer.state.items() if "exp_avg" in s)


def test_pretrain_trainer(tmp_path):
    # --short alone: the run is cut to the documented short step count (it ran the full 200 steps before).
    summary = load_example("pretrain_trainer").main(["--short", "--output-dir", str(tmp_path), "--batch-size", "4"])
    assert_foam_run(summary, block_size=4)
    assert summary["global_step"] == load_example("_common").SHORT_MAX_STEPS == 20
    assert math.isfinite(summary["eval_loss"])
    # --output-dir given: the trained model is saved there (the runs save no checkpoints on the way).
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    trained = dict(summary["trainer"].model.named_parameters())
    assert saved.keys() and all(torch.equal(saved[n], trained[n].detach()) for n in saved)


def test_pretrain_trainer_block_size_and_overrides_reach_the_optimizer(tmp_path):
    flags = short_flags(tmp_path, 2) + ["--block-size", "8", "--optim-args", "block_sizes=lm_head:2"]
    summary = load_example("pretrain_trainer").main(flags)
    assert_foam_run(summary, block_size=8, overrides={"lm_head": 2})


def test_sft_lora_gives_states_to_adapters_only(tmp_path):
    # By default adapters keep AdamW states (docs/benchmarks.md, "LoRA adapters"): same bytes as AdamW.
    summary = load_example("sft_lora").main(short_flags(tmp_path / "default", 3) + ["--lora-r", "8"])
    model = summary["trainer"].model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(summary["block_sizes"]) == trainable and all("lora_" in n for n in trainable)
    assert set(summary["block_sizes"].values()) == {1}
    assert (
        summary["state_bytes"]
        == summary["adamw_state_bytes"]
        == expected_state_bytes(model, {n: 1 for n in trainable})[1]
    )
    assert summary["losses"] and all(math.isfinite(x) for x in summary["losses"])
    # Folding lora_A by override, from the example's command line.
    flags = short_flags(tmp_path / "folded", 3) + ["--lora-r", "8", "--optim-args", "block_sizes=lora_A:4"]
    summary = load_example("sft_lora").main(flags)
    assert_foam_run(summary, block_size=4, overrides={"lora_A": 4})
    assert summary["block_sizes"] == expected_block_sizes(summary["trainer"].model, 4, {"lora_A": 4})
    assert {n for n, b in summary["block_sizes"].items() if b == 4} == {n for n in trainable if "lora_A" in n}


def test_dpo(tmp_path):
    summary = load_example("dpo").main(short_flags(tmp_path, 3))
    assert_foam_run(summary, block_size=4)
    assert summary["reward_margins"] and all(math.isfinite(x) for x in summary["reward_margins"])
    trainer = summary["trainer"]
    in_optimizer = {id(p) for g in unwrapped(trainer.optimizer).param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in trainer.ref_model.parameters())  # the reference stays frozen


def test_grpo(tmp_path):
    module = load_example("grpo")
    summary = module.main(short_flags(tmp_path, 3))
    assert_foam_run(summary, block_size=4)
    assert summary["rewards"] and all(math.isfinite(x) for x in summary["rewards"])


@pytest.mark.parametrize(
    "flags", [["--num-generations", "1"], ["--short", "--num-generations", "1"], ["--max-steps", "0"]]
)
def test_grpo_refuses_what_would_train_nothing_or_crash(flags, capsys):
    # --short used to replace any --num-generations by 2; 1 then trained, and without --short crashed in TRL.
    with pytest.raises(SystemExit) as exit_info:
        load_example("grpo").main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ("needs >= 2" in err or "0 is not >= 1" in err), err


def test_the_trl_examples_prompts_are_token_prefixes_of_prompt_and_completion():
    # A prompt ending in a newline lost it to a merge with the body's indent: TRL warned that every example trained
    # on a context it never sees at inference. Checked with the examples' own tokenizer, on their own pairs.
    common = load_example("_common")
    tokenizer = common.build_tokenizer()
    pairs = common.function_pairs(short=True)
    assert len(pairs) >= 20
    for prompt, completion in pairs:
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + completion)["input_ids"][: len(ids)] == ids, prompt


def test_grpo_reward_scores_function_bodies():
    reward = load_example("grpo").function_body_reward
    prompts = ["def f(x):\n"] * 3
    # A compiling indented body scores 1 + 1; half-indented non-compiling text 0.5; unindented junk 0.
    assert reward(prompts, ["    return x\n", "    y = (\nz", "))\n"]) == [2.0, 0.5, 0.0]


def test_plain_pytorch(capsys):
    results = load_example("plain_pytorch").main(["--short", "--batch-size", "4"])
    common = load_example("_common")
    model = common.tiny_llama(common.build_tokenizer(), "test")  # the model --short trains
    # What optim="foam" folds (foam_hf.foam_param_groups): linear layers, not the embeddings or the head.
    foam_bytes, adamw_bytes = expected_state_bytes(model, expected_block_sizes(model, 4))
    assert (results["foam"]["optimizer"], results["adamw"]["optimizer"]) == ("FOAM", "AdamW")
    assert (results["foam"]["state_bytes"], results["adamw"]["state_bytes"]) == (foam_bytes, adamw_bytes)
    for r in results.values():
        assert len(r["losses"]) == common.SHORT_MAX_STEPS and all(math.isfinite(x) for x in r["losses"])
    # Same starting weights and first batch: the same first loss, bit for bit. Then FOAM's steps lower it.
    assert results["foam"]["losses"][0] == results["adamw"]["losses"][0]
    assert results["foam"]["tail_mean_loss"] < results["foam"]["losses"][0] - 0.05
    assert f"{foam_bytes:,}" in capsys.readouterr().out


def test_plain_pytorch_applies_per_module_block_sizes():
    # Per-module block sizes by module name, as optim="foam" resolves them (they used to be refused here).
    results = load_example("plain_pytorch").main(
        ["--short", "--max-steps", "2", "--optim-args", "block_sizes=q_proj:8"]
    )
    common = load_example("_common")
    model = common.tiny_llama(common.build_tokenizer(), "test")
    assert (
        results["foam"]["state_bytes"] == expected_state_bytes(model, expected_block_sizes(model, 4, {"q_proj": 8}))[0]
    )


def test_the_block_size_given_twice_is_refused():
    with pytest.raises(SystemExit, match=r"--block-size 4 and \['block_size'\] in --optim-args 'block_size=8'.*Fix"):
        load_example("plain_pytorch").main(["--short", "--block-size", "4", "--optim-args", "block_size=8"])


def test_plain_pytorch_with_a_saved_model(tmp_path):
    from hf_fixtures import save_tiny_llama_and_text, tiny_llama

    shapes = save_tiny_llama_and_text(tmp_path / "model", tmp_path / "unused.jsonl")
    flags = ["--short", "--model-name-or-path", str(tmp_path / "model"), "--max-steps", "2", "--block-size", "8"]
    results = load_example("plain_pytorch").main(flags)
    model = tiny_llama()
    assert {n: list(p.shape) for n, p in model.named_parameters()} == shapes  # the model saved is this one
    assert (results["foam"]["state_bytes"], results["adamw"]["state_bytes"]) == expected_state_bytes(
        model, expected_block_sizes(model, 8)
    )


def launch_torchrun_example(script: str, *flags: str, cwd) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 examples/SCRIPT FLAGS`` (gloo on CPU), as the examples' docstrings launch."""
    cmd = [*torchrun(2), str(EXAMPLES / script), *flags]
    return run_process_tree(cmd, env=worker_env(), cwd=cwd, timeout=LAUNCH_TIMEOUT)


def assert_launched(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def three_finite_losses(proc: subprocess.CompletedProcess) -> bool:
    losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", proc.stdout, re.M)]
    return len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_fsdp2_torchrun(tmp_path):
    # Launched as its docstring says (torchrun, 2 ranks on gloo), on a saved model: --model-name-or-path and
    # --short together.
    from hf_fixtures import save_tiny_llama_and_text

    shapes = save_tiny_llama_and_text(tmp_path / "model", tmp_path / "unused.jsonl")
    flags = ["--short", "--model-name-or-path", str(tmp_path / "model"), "--max-steps", "3", "--batch-size", "2"]
    proc = launch_torchrun_example("fsdp2_torchrun.py", *flags, cwd=tmp_path)
    assert_launched(proc)
    assert three_finite_losses(proc)
    ranks = re.findall(
        r"^rank (\d): (\S+) \(([\d, ]+)\): exp_avg global \(([\d, ]+)\), local \(([\d, ]+)\)$", proc.stdout, re.M
    )
    assert sorted(r[0] for r in ranks) == ["0", "1"], proc.stdout
    for rank, name, param, moment, local in ranks:
        param, moment, local = ([int(x) for x in t.split(",")] for t in (param, moment, local))
        rows, n = shapes[name]
        assert param == [rows, n]
        assert moment == [rows, math.ceil(n / 4)]  # the folded global shape, block size 4
        # FSDP2 shards dim 0 as torch.chunk does: rank 0 the first ceil(rows / 2) rows, rank 1 the rest.
        assert local == [math.ceil(rows / 2) if rank == "0" else rows - math.ceil(rows / 2), math.ceil(n / 4)]


def test_fsdp2_torchrun_reports_when_nothing_folds(tmp_path):
    # --block-size 1 folds no tensor: the example says so on every rank and exits cleanly (it used to end in
    # StopIteration while looking for a folded moment to print).
    proc = launch_torchrun_example(
        "fsdp2_torchrun.py", "--short", "--max-steps", "1", "--block-size", "1", cwd=tmp_path
    )
    assert_launched(proc)
    reports = re.findall(r"^rank (\d): no tensor folds at block size 1", proc.stdout, re.M)
    assert sorted(reports) == ["0", "1"], proc.stdout


def test_tensor_parallel_torchrun(tmp_path):
    # Launched as its docstring says (torchrun, 2 ranks on gloo): transformers splits o_proj by columns, and each
    # rank's folded moment holds the folded columns of its half.
    flags = ["--short", "--max-steps", "3", "--batch-size", "2"]
    proc = launch_torchrun_example("tensor_parallel_torchrun.py", *flags, cwd=tmp_path)
    assert_launched(proc)
    assert three_finite_losses(proc)
    ranks = re.findall(
        r"^rank (\d): \S+o_proj.weight \(([\d, ]+)\) \['Shard\(dim=1\)'\]: exp_avg global \(([\d, ]+)\), "
        r"local \(([\d, ]+)\)$",
        proc.stdout,
        re.M,
    )
    assert sorted(r[0] for r in ranks) == ["0", "1"], proc.stdout
    for _, param, moment, local in ranks:
        (rows, n), moment, local = ([int(x) for x in t.split(",")] for t in (param, moment, local))
        assert moment == [rows, math.ceil(n / 4)]  # the folded global shape, block size 4
        assert local == [rows, n // 2 // 4]  # each rank's n / 2 columns, folded


def test_tensor_parallel_torchrun_refuses_a_split_that_cuts_blocks(tmp_path):
    # o_proj's columns split in 2 are pieces that blocks of 32 would cross ranks in: refused when FOAM is built,
    # naming the weight and the block size that fits.
    proc = launch_torchrun_example(
        "tensor_parallel_torchrun.py", "--short", "--max-steps", "1", "--block-size", "32", cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "into pieces of 16" in output, output[-3000:]
    assert "parameter 'model.layers.0.self_attn.o_proj.weight'" in output
    assert "block_sizes=model.layers.0.self_attn.o_proj:16" in output


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_every_example_takes_short_and_a_model(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--short" in text and "--model-name-or-path" in text


def printed_block_sizes(text: str) -> dict[str, int]:
    """Parse the table the example prints: ``name  (shape)  B  (state shape)``."""
    sizes = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].endswith(("weight", "bias")) and "(" in line:
            name, rest = line.split(maxsplit=1)
            sizes[name] = int(rest.split(")")[1].split()[0])
    return sizes


def test_per_module_block_sizes_from_python(tmp_path, capsys):
    module = load_example("per_module_block_sizes")
    result = module.main(["--short", "--output_dir", str(tmp_path)])
    assert result["route"] == "python"
    config = FoamConfig(block_size=4, block_sizes=module.PYTHON_BLOCK_SIZES)
    assert FoamConfig.from_optim_args(result["optim_args"]) == config
    expected = expected_block_sizes(result["model"], 4, module.PYTHON_BLOCK_SIZES)
    assert result["block_sizes"] == expected
    assert printed_block_sizes(capsys.readouterr().out) == expected
    assert (
        expected["model.layers.0.self_attn.v_proj.weight"] == 1
        and expected["model.layers.0.self_attn.q_proj.weight"] == 8
    )


def test_per_module_block_sizes_refuses_optim_args_it_would_replace(tmp_path):
    with pytest.raises(SystemExit, match=r"--optim_args 'block_size=8' without --optim foam.*Fix: add --optim foam"):
        load_example("per_module_block_sizes").main(
            ["--short", "--output_dir", str(tmp_path), "--optim_args", "block_size=8"]
        )


def test_per_module_block_sizes_from_the_command_line(tmp_path, capsys):
    optim_args = "block_size=2,block_sizes=q_proj:8;lm_head:32;embed_tokens:4"
    argv = ["--short", "--output_dir", str(tmp_path), "--optim", "foam", "--optim_args", optim_args]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]
    result = load_example("per_module_block_sizes").main(argv)
    assert result["route"] == "command line"
    expected = expected_block_sizes(result["model"], 2, {"q_proj": 8, "lm_head": 32, "embed_tokens": 4})
    assert result["block_sizes"] == expected
    assert printed_block_sizes(capsys.readouterr().out) == expected
    assert expected["model.embed_tokens.weight"] == 4 and expected["model.layers.0.mlp.up_proj.weight"] == 2
    assert expected["lm_head.weight"] == 32
    assert result["trainer"].state.global_step == 2


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    result = load_example("resume").main(short_flags(tmp_path, 4))
    assert (result["interrupted_step"], result["resumed_step"]) == (2, 4)
    assert result["weights_max_abs_diff"] == 0.0 and result["states_max_abs_diff"] == 0.0  # what it printed
    # and, compared here rather than trusted: the two Trainers' weights and FOAM states, bit for bit
    straight, resumed = result["straight"], result["resumed"]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert_same_state(unwrap_foam(straight.optimizer), unwrap_foam(resumed.optimizer))
    # The comparison is not vacuous: the checkpointed weights differ from the final ones.
    torch.load(result["checkpoint"] / "optimizer.pt", weights_only=True)  # Trainer's safe loading accepts it
    from safetensors.torch import load_file

    at_checkpoint = load_file(result["checkpoint"] / "model.safetensors")
    final = dict(result["resumed"].model.named_parameters())
    assert any(not torch.equal(at_checkpoint[n], final[n].detach()) for n in at_checkpoint if n in final)


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_every_example_documents_its_command_line(name):
    module = load_example(name)
    launcher = "torchrun --nproc_per_node=2" if name.endswith("_torchrun") else "python"
    assert f"{launcher} examples/{name}.py" in module.__doc__ and callable(module.main)
    assert f"examples/{name}.py --short" in module.__doc__
