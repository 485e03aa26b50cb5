"""One rank of ``transformers.Trainer`` with ``optim="foam"`` on a tiny Llama: FSDP2, DDP or 1 process, on CPU.

Launched by tests/test_trainer_fsdp.py in a subprocess (pytest never collects it: no ``test_`` prefix):

    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/trainer_fsdp2.py --fsdp --cpu-fsdp-shim --out DIR
    torchrun ... trainer_fsdp2.py --fsdp --cpu-fsdp-shim --cpu-offload --out DIR   # fsdp_config["cpu_offload"]
    accelerate launch --config_file fsdp2.yaml tests/_dist_workers/trainer_fsdp2.py --cpu-fsdp-shim --out DIR
    python tests/_dist_workers/trainer_fsdp2.py --out DIR                       # the 1-process reference

Rank 0 writes ``DIR/result.pt``: the full (unsharded) weights and FOAM moments, the local moment shapes, what
accelerate made of the run (FSDP version, parameter types, CPU offload), which FOAM implementation stepped
which tensors, and the logged losses and ``foam/*`` values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 ranks share 2 cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hf_fixtures, _helpers


def tiny_llama(seed: int = 0):
    from hf_fixtures import RANK_SEQ, RANK_VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=RANK_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=RANK_SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def force_fsdp_on_cpu() -> None:
    """Make accelerate honour an FSDP plugin on CPU processes (gloo), where it silently runs DDP instead.

    ``AcceleratorState.__init__`` switches to ``DistributedType.FSDP`` only when the processes run on an
    accelerator (its list holds MULTI_GPU, MULTI_XPU, MULTI_NPU, ... but not MULTI_CPU), so on CPU the plugin
    is dropped. This sets what that branch sets: the type, the plugin, and the copy of the type accelerate
    keeps in ``PartialState`` (later ``AcceleratorState()`` calls read it back). Everything after it
    (``fsdp2_prepare_model``, the Trainer's optimizer creation, ``get_state_dict``, ``save_fsdp_optimizer``,
    ``load_fsdp_optimizer``) is accelerate's and transformers' own code, as on GPUs.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            shared = getattr(PartialState, "_shared_state", None)
            if not isinstance(shared, dict) or "distributed_type" not in shared:
                raise RuntimeError(
                    "tests: accelerate's PartialState no longer keeps _shared_state['distributed_type']; "
                    "update force_fsdp_on_cpu (tests/_dist_workers/trainer_fsdp2.py) to this accelerate."
                )
            shared["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def unpinned_cpu_offload() -> None:
    """FSDP2 CPU offload without pinned memory, which needs an accelerator (``Tensor.pin_memory()`` raises
    "Cannot access accelerator device when none is available" on a CPU-only machine).

    ``fsdp_config["cpu_offload"]=True`` reaches accelerate as ``cpu_offload=True``, which its plugin turns into
    ``CPUOffloadPolicy()`` (``pin_memory=True``). This swaps in ``CPUOffloadPolicy(pin_memory=False)`` after
    that conversion; ``fully_shard`` then offloads as on a GPU machine, minus the pinning.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    original = FullyShardedDataParallelPlugin.set_cpu_offload

    def set_cpu_offload(self):
        original(self)
        if isinstance(self.cpu_offload, CPUOffloadPolicy):
            self.cpu_offload = CPUOffloadPolicy(pin_memory=False)

    FullyShardedDataParallelPlugin.set_cpu_offload = set_cpu_offload


def record_implementations() -> list[dict]:
    """Record, for every call of FOAM's functional step, which implementation ran and on what tensors."""
    from _helpers import STEP_FUNCTIONS

    calls: list[dict] = []
    for name, (module, attribute) in STEP_FUNCTIONS.items():
        original = getattr(module, attribute)

        def recording(params, *args, _original=original, _name=name, **kwargs):
            calls.append(
                {
                    "impl": _name,
                    "devices": sorted({p.device.type for p in params}),
                    "types": sorted({type(p).__name__ for p in params}),
                }
            )
            return _original(params, *args, **kwargs)

        setattr(module, attribute, recording)
    return calls


def offloaded(model) -> list[bool]:
    """Whether FSDP2 holds each of the model's parameters offloaded to CPU (``CPUOffloadPolicy``)."""
    flags = []
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None) if state is not None else None
        flags += [fsdp_param.offload_to_cpu for fsdp_param in (group.fsdp_params if group else [])]
    return flags


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def local_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.to_local().shape) if hasattr(t, "to_local") else tuple(t.shape)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 from TrainingArguments(fsdp=True, fsdp_config)")
    parser.add_argument("--cpu-fsdp-shim", action="store_true", help="see force_fsdp_on_cpu")
    parser.add_argument("--state-dict-type", default="FULL_STATE_DICT", help="fsdp_config['state_dict_type']")
    parser.add_argument("--cpu-offload", action="store_true", help="fsdp_config['cpu_offload']=True")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument(
        "--interrupt-at", type=int, default=0, help="save and stop at this step, then resume in a new Trainer"
    )
    args = parser.parse_args()

    from hf_fixtures import StopAt, TokenRows, end_rank, rank_training_args, unwrap_foam
    from transformers import Trainer

    import foam_hf  # noqa: F401  (registers optim="foam")

    if args.cpu_fsdp_shim:
        force_fsdp_on_cpu()
        if args.cpu_offload:
            unpinned_cpu_offload()
    calls = record_implementations()
    fsdp_kwargs = {}
    if args.fsdp:
        fsdp_kwargs = dict(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "state_dict_type": args.state_dict_type,
                **({"cpu_offload": True} if args.cpu_offload else {}),
            },
        )

    def make_trainer(*, save_steps: int = 0, stop_at: int = 0, init_seed: int = 0) -> Trainer:
        training_args = rank_training_args(
            os.path.join(args.out, "run"), max_steps=args.max_steps, save_steps=save_steps, **fsdp_kwargs
        )
        return Trainer(
            model=tiny_llama(init_seed),
            args=training_args,
            train_dataset=TokenRows(),
            callbacks=[StopAt(stop_at)] if stop_at else [],
        )

    if args.interrupt_at:
        # Train, save at step `interrupt_at` and stop there; then a new Trainer on a model with other initial
        # weights resumes from that checkpoint (both in this process, as a restarted job would do in a new one).
        make_trainer(save_steps=args.interrupt_at, stop_at=args.interrupt_at).train()
        trainer = make_trainer(init_seed=1)
        trainer.train(resume_from_checkpoint=os.path.join(args.out, "run", f"checkpoint-{args.interrupt_at}"))
    else:
        trainer = make_trainer()
        trainer.train()

    optimizer = unwrap_foam(trainer.optimizer)
    named = list(trainer.model.named_parameters())
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    result = {
        "optimizer": type(optimizer).__name__,
        "distributed_type": getattr(trainer.accelerator.distributed_type, "value", None),
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "param_types": sorted({type(p).__name__ for _, p in named}),
        "params": {n: full(p) for n, p in named},
        "exp_avg": {n: full(optimizer.state[p]["exp_avg"]) for n, p in named},
        "exp_avg_sq": {n: full(optimizer.state[p]["exp_avg_sq"]) for n, p in named},
        "local_exp_avg_shapes": {n: local_shape(optimizer.state[p]["exp_avg"]) for n, p in named},
        "steps": trainer.state.global_step,
        "offloaded": offloaded(trainer.model),
        "implementations": calls,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "foam_logs": [
            {k: v for k, v in e.items() if k.startswith("foam/")} for e in trainer.state.log_history if "loss" in e
        ],
    }
    if trainer.accelerator.is_main_process:
        torch.save(result, os.path.join(args.out, "result.pt"))
    end_rank()  # not a plain return: see hf_fixtures.end_rank


if __name__ == "__main__":
    main()
