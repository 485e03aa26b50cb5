"""``transformers.Trainer`` with ``optim="foam"`` under FSDP2, on 2 CPU processes (gloo), held to 1 process.

Every run is a subprocess (``tests/_dist_workers/trainer_fsdp2.py``) started with torchrun or ``accelerate
launch``, as a user would start it; the assertions run here on what rank 0 wrote.

On CPU, accelerate (1.15, 1.16) ignores the FSDP plugin and runs DDP: ``AcceleratorState.__init__`` switches to
``DistributedType.FSDP`` only when the processes run on an accelerator (``MULTI_CPU`` is missing from its list of
distributed types, accelerate/state.py, the ``elif self.distributed_type in [...]`` branch after the DeepSpeed
one). ``test_fsdp_args_on_cpu_without_the_shim_train_as_one_process`` runs that case as it comes. The other tests
set the three fields that branch would have set (``force_fsdp_on_cpu`` in the worker) and run everything else as
shipped: Trainer's ``fsdp``/``fsdp_config`` arguments or accelerate's launcher, ``fsdp2_prepare_model``
(``fully_shard`` per decoder layer and on the root), optimizer creation after wrapping, gradient clipping, and
Trainer's FSDP checkpoint save and ``resume_from_checkpoint``; with ``fsdp_config["cpu_offload"]``, FSDP2's
``CPUOffloadPolicy`` too, unpinned (pinned host memory needs an accelerator).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _helpers import DIST_TOLERANCE as TOLERANCE
from _helpers import DIST_WORKERS, accelerate_launch, torchrun
from _helpers import launch as launch_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORKER = str(DIST_WORKERS / "trainer_fsdp2.py")
ACCELERATE_FSDP2_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
"""


def launch(launcher: list[str], out: Path, *worker_args: str) -> dict:
    return launch_worker(launcher, out, *worker_args, worker=WORKER)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return launch([], tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> dict:
    return launch(torchrun(), tmp_path_factory.mktemp("fsdp2"), "--fsdp", "--cpu-fsdp-shim")


def assert_same_run(got: dict, want: dict, *, atol: float) -> None:
    assert got["optimizer"] == want["optimizer"] == "FOAM"
    assert got["steps"] == want["steps"] == 4
    assert got["params"].keys() == want["params"].keys()
    for key in ("params", "exp_avg", "exp_avg_sq"):
        for name, tensor in want[key].items():
            if atol == 0:
                assert torch.equal(got[key][name], tensor), f"{key} of {name} differs"
            else:
                torch.testing.assert_close(got[key][name], tensor, atol=atol, rtol=0, msg=f"{key} of {name}")


def assert_fsdp2(result: dict) -> None:
    assert result["distributed_type"] == "FSDP" and result["fsdp_version"] == 2
    assert result["param_types"] == ["DTensor"]
    # Folded moments: (32, 32) -> (32, 8) globally, each rank holds half of the rows.
    assert result["exp_avg"]["model.layers.0.self_attn.q_proj.weight"].shape == (32, 8)
    assert result["local_exp_avg_shapes"]["model.layers.0.self_attn.q_proj.weight"] == (16, 8)
    # Not folded (embeddings keep AdamW states), still sharded by rows.
    assert result["local_exp_avg_shapes"]["model.embed_tokens.weight"] == (32, 32)


def test_trainer_fsdp2_cpu_offload_steps_the_offloaded_shards_with_the_fused_kernel(one_process, tmp_path):
    # Trainer's fsdp_config["cpu_offload"]=True: FSDP2's CPUOffloadPolicy keeps every shard, its gradient and
    # FOAM's moments on the host, and FOAM steps them there, as under ZeRO-Offload-like setups on GPUs. The
    # worker unpins the offload (pinned memory needs an accelerator; see unpinned_cpu_offload there).
    result = launch(torchrun(), tmp_path, "--fsdp", "--cpu-fsdp-shim", "--cpu-offload")
    assert_fsdp2(result)
    assert result["offloaded"] and all(result["offloaded"])
    # Each step's local shards are plain, contiguous CPU tensors: the fused C++ kernel takes them (where a
    # compiler exists to build it), one call per param group and step.
    fused = bool(shutil.which("c++") or shutil.which("g++"))
    implementations = {(c["impl"], tuple(c["devices"]), tuple(c["types"])) for c in result["implementations"]}
    assert implementations == {("_fused_foam" if fused else "_single_tensor_foam", ("cpu",), ("Tensor",))}
    assert len(result["implementations"]) == len(one_process["implementations"])  # per group and step, as there
    assert_same_run(result, one_process, atol=TOLERANCE)
    assert result["losses"] == pytest.approx(one_process["losses"], abs=1e-5)


def test_trainer_fsdp2_matches_one_process(one_process, fsdp2):
    assert one_process["param_types"] == ["Parameter"]
    assert_fsdp2(fsdp2)
    assert_same_run(fsdp2, one_process, atol=TOLERANCE)
    assert fsdp2["losses"] == pytest.approx(one_process["losses"], abs=1e-5)
    # FoamCallback under FSDP2: global state bytes, and the residual ratio summed over every rank's rows.
    first, want = fsdp2["foam_logs"][0], one_process["foam_logs"][0]
    assert first["foam/state_bytes"] == want["foam/state_bytes"] and first["foam/folded_params"] == 14
    got_ratios = [log["foam/residual_ratio"] for log in fsdp2["foam_logs"]]
    want_ratios = [log["foam/residual_ratio"] for log in one_process["foam_logs"]]
    assert got_ratios == pytest.approx(want_ratios, abs=1e-6)


@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_trainer_fsdp2_resumes_exactly(state_dict_type, fsdp2, tmp_path):
    fsdp_args = ["--fsdp", "--cpu-fsdp-shim", "--state-dict-type", state_dict_type]
    # Save at step 2 and stop; a new Trainer on a model with other initial weights resumes and runs steps 3-4.
    resumed = launch(torchrun(), tmp_path, *fsdp_args, "--interrupt-at", "2")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    if state_dict_type == "FULL_STATE_DICT":
        # One torch.save'd optimizer state (whatever accelerate names the file) with the folded moments, gathered
        # to their full (global) shapes.
        (saved_file,) = checkpoint.glob("optimizer*.bin")
        saved = torch.load(saved_file, weights_only=True)
        assert saved["state"]["model.layers.0.self_attn.q_proj.weight"]["exp_avg"].shape == (32, 8)
        assert {group["block_size"] for group in saved["param_groups"]} == {1, 4}  # unfolded groups say 1
    assert_fsdp2(resumed)
    # CPU ops are deterministic: the resumed run is the uninterrupted one, bit for bit.
    assert_same_run(resumed, fsdp2, atol=0)


def test_accelerate_launch_fsdp2_config_file_matches_trainer_args(fsdp2, tmp_path):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(ACCELERATE_FSDP2_YAML)
    result = launch(accelerate_launch(config), tmp_path / "run", "--cpu-fsdp-shim")  # no fsdp= in the arguments
    assert_fsdp2(result)
    assert_same_run(result, fsdp2, atol=0)  # the same wrapping and reductions as TrainingArguments(fsdp=...)


def test_fsdp_args_on_cpu_without_the_shim_train_as_one_process(one_process, tmp_path):
    # Without the shim, accelerate (1.15, 1.16) drops the FSDP plugin on CPU (see the module docstring) and runs
    # DDP. Whichever engine this accelerate picks, FOAM must train exactly and keep folded moments; which one it
    # picks is accelerate's business, not asserted.
    result = launch(torchrun(), tmp_path, "--fsdp")
    if result["param_types"] == ["DTensor"]:  # an accelerate that runs FSDP on CPU
        assert_fsdp2(result)
    else:  # DDP: plain parameters, full folded moments on every rank
        assert result["param_types"] == ["Parameter"]
        assert result["local_exp_avg_shapes"]["model.layers.0.self_attn.q_proj.weight"] == (32, 8)
    assert_same_run(result, one_process, atol=TOLERANCE)
