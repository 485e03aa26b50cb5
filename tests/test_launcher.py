"""optim="foam" from unmodified command lines: ``foam-hf run``, ``python -m foam_hf.run`` under
``accelerate launch`` and ``torchrun``, the ``trl`` CLI with flags and with a YAML config, and
``foam-hf autoregister`` in a fresh virtual environment. Real CLIs, tiny local model and data, offline.

What each test checks is independent of foam-hf's own reporting: the optimizer state the run saved (moment
shapes computed here from the model's shapes and the block size), the error the real CLI prints without
registration, the weights of an uninterrupted run for resume."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from _helpers import run_process_tree

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_scripts" / "hf_train.py"
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
}
ENV.pop("PYTHONPATH", None)  # what a user's shell has: nothing of ours


def sh(*command, env=None, cwd=None, timeout=1500):
    return run_process_tree([str(c) for c in command], env=env or ENV, cwd=cwd, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def folded(shape, block_size):
    *rows, n = shape
    return [*rows, math.ceil(n / block_size)]


# ------------------------------------------------------------------ the HfArgumentParser script

TRAIN_ARGS = [
    "--optim",
    "foam",
    "--optim_args",
    "block_size=8",
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--report_to",
    "none",
    "--use_cpu",
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
]


def check_script_result(out: Path, world_size: int = 1) -> dict:
    result = json.loads((out / "result.json").read_text())
    assert result["optimizer"] == "foam_hf.optim.FOAM"
    assert result["world_size"] == world_size
    # hidden 36, intermediate 70, one layer: the decoder's linear weights fold at B=8 (ragged last blocks).
    shapes = result["moment_shapes"]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == folded([36, 36], 8) == [36, 5]
    assert shapes["model.layers.0.mlp.down_proj.weight"] == folded([36, 70], 8) == [36, 9]
    assert shapes["model.layers.0.mlp.up_proj.weight"] == folded([70, 36], 8)
    assert shapes["lm_head.weight"] == [64, 36] and shapes["model.embed_tokens.weight"] == [64, 36]  # not folded
    return result


def test_an_unmodified_script_fails_without_registration(tmp_path):
    result = sh(sys.executable, SCRIPT, "--output_dir", tmp_path, *TRAIN_ARGS)
    assert result.returncode != 0 and "invalid choice: 'foam'" in result.stderr


@pytest.mark.parametrize(
    "route",
    ["foam-hf run python", "python -m foam_hf.run", "accelerate launch -m foam_hf.run", "torchrun -m foam_hf.run"],
)
def test_an_unmodified_script_trains_with_foam_through_each_route(tmp_path, route):
    out = tmp_path / "out"
    prefix = {
        "foam-hf run python": [BIN / "foam-hf", "run", sys.executable],
        "python -m foam_hf.run": [sys.executable, "-m", "foam_hf.run"],
        "accelerate launch -m foam_hf.run": [
            BIN / "accelerate",
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "foam_hf.run",
        ],
        "torchrun -m foam_hf.run": [BIN / "torchrun", "--nproc-per-node", "1", "-m", "foam_hf.run"],
    }[route]
    ok(sh(*prefix, SCRIPT, "--output_dir", out, *TRAIN_ARGS))
    check_script_result(out)


def test_torchrun_two_ranks_both_register(tmp_path):
    out = tmp_path / "out"
    # HF_TRAIN_END_RANK: each rank leaves without finalization once its results are saved (hf_train.py says why)
    env = {**ENV, "TORCH_CPP_LOG_LEVEL": "ERROR", "HF_TRAIN_END_RANK": "1"}
    ok(
        sh(
            BIN / "torchrun",
            "--nproc-per-node",
            "2",
            "-m",
            "foam_hf.run",
            SCRIPT,
            "--output_dir",
            out,
            *TRAIN_ARGS,
            "--ddp_backend",
            "gloo",
            env=env,
        )
    )
    check_script_result(out, world_size=2)


def test_a_json_config_names_foam(tmp_path):
    out = tmp_path / "out"
    config = {
        "output_dir": str(out),
        "optim": "foam",
        "optim_args": "block_size=8",
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
    }
    (tmp_path / "args.json").write_text(json.dumps(config))
    failed = sh(sys.executable, SCRIPT, tmp_path / "args.json")
    # Without the launcher transformers refuses the name: a ValueError naming 'foam' (its wording is its own).
    last = failed.stderr.splitlines()[-1]
    assert failed.returncode != 0 and last.startswith("ValueError") and re.search(r"\bfoam\b(?![-_])", last), last
    ok(sh(BIN / "foam-hf", "run", sys.executable, SCRIPT, tmp_path / "args.json"))
    check_script_result(out)


def test_resume_through_the_launcher_equals_the_uninterrupted_run(tmp_path):
    launch = [BIN / "foam-hf", "run", sys.executable, SCRIPT]
    args = [a for a in TRAIN_ARGS if a not in ("--save_strategy", "no")]
    args[args.index("--max_steps") + 1] = "4"
    whole, split = tmp_path / "whole", tmp_path / "split"
    ok(sh(*launch, "--output_dir", whole, *args, "--save_strategy", "no"))
    ok(sh(*launch, "--output_dir", split, *args, "--save_strategy", "steps", "--save_steps", "2"))
    shutil.rmtree(split / "checkpoint-4")
    (split / "w.pt").unlink()
    ok(
        sh(
            *launch,
            "--output_dir",
            split,
            *args,
            "--save_strategy",
            "no",
            "--resume_from_checkpoint",
            split / "checkpoint-2",
        )
    )
    expected, resumed = torch.load(whole / "w.pt"), torch.load(split / "w.pt")
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("route", ["foam-hf run python", "python -m foam_hf.run"])
def test_bad_optim_args_fail_at_parse_time_through_the_launcher(tmp_path, route):
    prefix = (
        [BIN / "foam-hf", "run", sys.executable]
        if route == "foam-hf run python"
        else [sys.executable, "-m", "foam_hf.run"]
    )
    args = list(TRAIN_ARGS)
    args[args.index("block_size=8")] = "block_size=0"
    result = sh(*prefix, SCRIPT, "--output_dir", tmp_path / "out", *args)
    assert result.returncode != 0
    assert "block_size=0 is invalid" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "out" / "result.json").exists()  # refused before training


def test_the_launcher_returns_the_command_exit_code():
    assert sh(BIN / "foam-hf", "run", sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    assert sh(BIN / "foam-hf", "run", "no-such-command-here").returncode == 127
    child = sh(
        BIN / "foam-hf",
        "run",
        sys.executable,
        "-c",
        "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', "
        "'import sys; sys.exit(0 if \"foam_hf\" in sys.modules else 9)']))",
    )
    assert child.returncode == 0  # a grandchild process has foam_hf imported at start-up


@pytest.mark.parametrize("route", ["foam-hf run", "python -m foam_hf.run", "python -m foam_hf.run -m"])
def test_a_missing_command_script_or_module_is_one_clear_line(tmp_path, route):
    missing = tmp_path / "no_such_thing"
    command = {
        "foam-hf run": [sys.executable, "-m", "foam_hf", "run", missing],
        "python -m foam_hf.run": [sys.executable, "-m", "foam_hf.run", missing],
        "python -m foam_hf.run -m": [sys.executable, "-m", "foam_hf.run", "-m", "no_such_module.sub"],
    }[route]
    result = sh(*command, "--optim", "foam", env={**ENV, "PYTHONPATH": str(HERE.parent)})  # this checkout's code
    # The shell's exit code for a command not found (127), argparse's for a usage error (2).
    assert result.returncode == (127 if route == "foam-hf run" else 2), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    name = "no_such_module.sub" if route.endswith("-m") else str(missing)
    assert name in result.stderr and "Fix:" in result.stderr, result.stderr


def test_the_launcher_keeps_an_existing_sitecustomize(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['SITECUSTOMIZE_RAN'] = 'yes'\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    code = (
        "import os, sys; "
        "sys.exit(0 if os.environ.get('SITECUSTOMIZE_RAN') == 'yes' and 'foam_hf' in sys.modules else 5)"
    )
    assert sh(BIN / "foam-hf", "run", sys.executable, "-c", code, env=env).returncode == 0


def test_two_copies_of_the_start_up_folder_on_the_path_run_the_environment_sitecustomize_once(tmp_path):
    # One folder under two spellings (or another environment's foam-hf launching this one's python -m foam_hf.run):
    # each copy of our sitecustomize must skip both, not run the other one forever.
    from foam_hf.launcher import STARTUP_DIR

    (tmp_path / "alias").symlink_to(STARTUP_DIR)
    (tmp_path / "env_site").mkdir()
    (tmp_path / "env_site" / "sitecustomize.py").write_text(
        "import os\nos.environ['RUNS'] = os.environ.get('RUNS', '') + 'x'\n"
    )
    # The PYTHONPATH a process under two launchers sees: both copies before the environment's own folder.
    path = [STARTUP_DIR, str(tmp_path / "alias"), str(tmp_path / "env_site")]
    code = "import os, sys; print(os.environ.get('RUNS'), 'foam_hf' in sys.modules)"
    result = ok(sh(sys.executable, "-c", code, env={**ENV, "PYTHONPATH": os.pathsep.join(path)}))
    assert result.stdout.split() == ["x", "True"] and "Error" not in result.stderr, result.stderr
    # A copy of an older foam-hf, which skips only its own folder, before or after this one: no recursion either.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sitecustomize.py").write_text(OLD_STARTUP_FILE)
    for first, second in ((STARTUP_DIR, str(tmp_path / "old")), (str(tmp_path / "old"), STARTUP_DIR)):
        env = {**ENV, "PYTHONPATH": os.pathsep.join([first, second, str(tmp_path / "env_site")])}
        result = ok(sh(sys.executable, "-c", code, env=env))
        assert result.stdout.split() == ["x", "True"] and "Error" not in result.stderr, result.stderr


#: The start-up file of foam-hf 0.1.0 (up to this fix), which another environment's foam-hf may still put first.
OLD_STARTUP_FILE = '''"""Put on ``PYTHONPATH`` by ``foam-hf run`` and ``python -m foam_hf.run``."""

import os
import sys


def _start():
    here = os.path.dirname(os.path.abspath(__file__))
    import foam_hf  # noqa: F401
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_start()
'''


def test_an_empty_pythonpath_entry_still_means_the_current_directory(tmp_path):
    from foam_hf.launcher import STARTUP_DIR, launch_env

    assert launch_env({"PYTHONPATH": ":/x"})["PYTHONPATH"] == os.pathsep.join([STARTUP_DIR, "", "/x"])
    assert launch_env({})["PYTHONPATH"] == STARTUP_DIR  # no PYTHONPATH: no empty entry added
    (tmp_path / "mylib.py").write_text("VALUE = 7\n")
    code = "import mylib; print(mylib.VALUE)"
    env = {**ENV, "PYTHONPATH": os.pathsep + "/nonexistent"}
    assert ok(sh(BIN / "foam-hf", "run", sys.executable, "-c", code, env=env, cwd=tmp_path)).stdout.strip() == "7"


def test_a_symlinked_script_imports_beside_its_real_file_as_python_would(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "real" / "helper.py").write_text("NAME = 'helper ok'\n")
    (tmp_path / "real" / "train.py").write_text("import helper\nprint(helper.NAME)\n")
    (tmp_path / "other" / "train.py").symlink_to(tmp_path / "real" / "train.py")
    plain = ok(sh(sys.executable, "other/train.py", cwd=tmp_path)).stdout
    assert ok(sh(sys.executable, "-m", "foam_hf.run", "other/train.py", cwd=tmp_path)).stdout == plain == "helper ok\n"


def test_a_module_whose_package_fails_to_import_shows_the_real_error(tmp_path):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import nonexistent_dependency_xyz\n")
    (tmp_path / "brokenpkg" / "train.py").write_text("print('ran')\n")
    result = sh(sys.executable, "-m", "foam_hf.run", "-m", "brokenpkg.train", cwd=tmp_path)
    assert result.returncode == 1 and "No module named 'nonexistent_dependency_xyz'" in result.stderr, result.stderr
    assert "check the name" not in result.stderr  # not reworded as a missing brokenpkg.train


def test_a_file_that_is_not_executable_is_named_as_such(tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("echo hi\n")
    result = sh(BIN / "foam-hf", "run", script)
    assert result.returncode == 126 and "not executable" in result.stderr and f"bash {script}" in result.stderr


def test_a_program_in_the_current_directory_is_told_to_take_its_dot_slash(tmp_path):
    script = tmp_path / "runme.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    result = sh(BIN / "foam-hf", "run", "runme.sh", cwd=tmp_path)
    assert (
        result.returncode == 127 and "not on PATH" in result.stderr and "Fix: foam-hf run ./runme.sh" in result.stderr
    )
    assert ok(sh(BIN / "foam-hf", "run", "./runme.sh", cwd=tmp_path)).stdout == "ran\n"


def test_a_missing_site_dir_is_still_a_file_not_found_error(tmp_path):
    from foam_hf.launcher import autoregister

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        autoregister(True, tmp_path / "nope")


def test_usage_errors_go_to_stderr():
    result = sh(sys.executable, "-m", "foam_hf.run")
    assert result.returncode == 2 and result.stdout == "" and "usage: python -m foam_hf.run" in result.stderr
    assert ok(sh(sys.executable, "-m", "foam_hf.run", "--help")).stdout.startswith("usage:")
    # foam-hf run without a command: the same kind of usage error (it exited 1 with no usage line)
    for args in ((), ("--",)):
        result = sh(BIN / "foam-hf", "run", *args)
        assert result.returncode == 2 and result.stdout == "" and "usage: foam-hf run CMD" in result.stderr


def test_a_leading_double_dash_is_dropped_on_both_routes(tmp_path):
    # `foam-hf run -- python t.py` took it; `python -m foam_hf.run -- t.py` answered "can't open script '--'".
    script = tmp_path / "t.py"
    script.write_text("import sys; print(sys.argv[1:])")
    for route in ([BIN / "foam-hf", "run", "--", sys.executable], [sys.executable, "-m", "foam_hf.run", "--"]):
        assert ok(sh(*route, script, "x")).stdout.strip() == "['x']"


# ------------------------------------------------------------------ the trl CLI


@pytest.fixture(scope="module")
def sft_assets(tmp_path_factory):
    from hf_fixtures import save_tiny_llama_and_text

    root = tmp_path_factory.mktemp("sft")
    return root, save_tiny_llama_and_text(root / "model", root / "data" / "train.jsonl")


FOAM_HF_RUN_TRL_SFT = [BIN / "foam-hf", "run", BIN / "trl", "sft"]


def sft_config(root, out) -> dict:
    return {
        "model_name_or_path": str(root / "model"),
        "dataset_name": str(root / "data"),
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 3,
        "report_to": "none",
        "use_cpu": True,
        "max_length": 32,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def sft_args(root, out):
    flags = []
    for key, value in sft_config(root, out).items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def check_sft_run(out: Path, shapes: dict, block_size: int):
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = {k for entry in state["log_history"] for k in entry}
    assert {"foam/state_bytes", "foam/state_ratio"} <= logged, sorted(logged)
    saved = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {g["block_size"] for g in saved["param_groups"]} >= {block_size}
    folded_moments = sorted(
        list(s["exp_avg"].shape)
        for g in saved["param_groups"]
        if g["block_size"] == block_size
        for s in (saved["state"][i] for i in g["params"])
    )
    expected = sorted(folded(shape, block_size) for n, shape in shapes.items() if n.endswith("_proj.weight"))
    assert folded_moments == expected


def test_trl_sft_without_registration_refuses_optim_foam(sft_assets, tmp_path):
    root, _ = sft_assets
    result = sh(BIN / "trl", "sft", *sft_args(root, tmp_path / "out"), "--optim", "foam")
    assert result.returncode != 0 and "invalid choice: 'foam'" in result.stderr


def test_trl_sft_through_foam_hf_run(sft_assets, tmp_path):
    root, shapes = sft_assets
    out = tmp_path / "out"
    ok(sh(*FOAM_HF_RUN_TRL_SFT, *sft_args(root, out), "--optim", "foam", "--optim_args", "block_size=8"))
    check_sft_run(out, shapes, 8)


def test_trl_sft_with_a_yaml_config_through_foam_hf_run(sft_assets, tmp_path):
    root, shapes = sft_assets
    out = tmp_path / "out"
    config = {**sft_config(root, out), "optim": "foam", "optim_args": "block_size=4"}
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    (tmp_path / "sft.yaml").write_text("\n".join(lines) + "\n")
    ok(sh(*FOAM_HF_RUN_TRL_SFT, "--config", tmp_path / "sft.yaml"))
    check_sft_run(out, shapes, 4)


def test_trl_sft_bad_optim_args_fail_at_parse_time(sft_assets, tmp_path):
    root, _ = sft_assets
    result = sh(
        *FOAM_HF_RUN_TRL_SFT, *sft_args(root, tmp_path / "out"), "--optim", "foam", "--optim_args", "block_sise=8"
    )
    assert result.returncode != 0
    assert "unknown key(s) ['block_sise']" in result.stderr and "Valid keys" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ autoregister in a fresh environment


@pytest.fixture
def fresh_venv(tmp_path):
    """A new virtual environment that sees this one's packages (as an install of foam-hf into it would) but
    has nothing of foam-hf's in its own site-packages until the test puts it there."""
    venv = tmp_path / "venv"
    ok(sh(sys.executable, "-m", "venv", "--without-pip", venv))
    python = venv / "bin" / "python"
    purelib = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = sysconfig.get_paths()["purelib"]
    # addsitedir (not a bare path line) so that this environment's own .pth files, an editable install's, run too
    (purelib / "00-parent-env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python, purelib


def test_autoregister_on_makes_a_bare_trl_sft_accept_foam_and_off_restores_the_error(sft_assets, tmp_path, fresh_venv):
    root, shapes = sft_assets
    python, purelib = fresh_venv
    trl = [python, "-m", "trl.cli.main", "sft"]
    status = ok(sh(python, "-m", "foam_hf", "autoregister", "status")).stdout
    assert "off" in status and str(purelib) in status

    ok(sh(python, "-m", "foam_hf", "autoregister", "on"))
    assert (purelib / "foam_hf-autoregister.pth").exists() and (purelib / "foam_hf-autoregister.start").exists()
    assert "on" in ok(sh(python, "-m", "foam_hf", "autoregister", "status")).stdout
    # Start-up stays light: the hook imports foam_hf, never torch or transformers, until transformers is imported.
    probe = "import sys; print('foam_hf' in sys.modules, 'torch' in sys.modules, 'transformers' in sys.modules)"
    assert ok(sh(python, "-c", probe)).stdout.split() == ["True", "False", "False"]
    out = tmp_path / "out"
    ok(sh(*trl, *sft_args(root, out), "--optim", "foam", "--optim_args", "block_size=8"))
    check_sft_run(out, shapes, 8)

    ok(sh(python, "-m", "foam_hf", "autoregister", "off"))
    assert not list(purelib.glob("foam_hf-autoregister.*"))
    result = sh(*trl, *sft_args(root, tmp_path / "again"), "--optim", "foam")
    assert result.returncode != 0 and "invalid choice: 'foam'" in result.stderr


def test_autoregister_refuses_a_missing_site_dir(tmp_path):
    result = sh(sys.executable, "-m", "foam_hf", "autoregister", "on", "--site-dir", tmp_path / "nope")
    assert result.returncode == 2 and "is not a directory" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr  # one line, as the CLI's other refusals


def test_autoregister_warns_when_python_would_never_read_the_folder(tmp_path):
    result = ok(sh(sys.executable, "-m", "foam_hf", "autoregister", "on", "--site-dir", tmp_path))
    assert "not a site-packages folder" in result.stderr and "Fix:" in result.stderr and "on (" in result.stdout


def test_autoregister_names_a_folder_it_may_not_write(tmp_path, monkeypatch, capsys):
    from foam_hf.tools import cli

    site = tmp_path / "site-packages"
    site.mkdir()

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)  # as a root-owned system site-packages answers
    assert cli.main(["autoregister", "on", "--site-dir", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the start-up hook in {site} (Permission denied)" in err and "--user-site" in err


def test_autoregister_off_says_whether_it_removed_a_hook(tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    assert ok(sh(sys.executable, "-m", "foam_hf", "autoregister", "on", "--site-dir", site)).stderr == ""
    removed = ok(sh(sys.executable, "-m", "foam_hf", "autoregister", "off", "--site-dir", site)).stdout
    assert "off (removed " in removed and "foam_hf-autoregister.pth" in removed and not list(site.iterdir())
    again = ok(sh(sys.executable, "-m", "foam_hf", "autoregister", "off", "--site-dir", site)).stdout
    assert f"off (no hook in {site})" in again
