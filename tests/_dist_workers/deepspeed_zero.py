"""One rank of ``transformers.Trainer`` with ``optim="foam"`` under DeepSpeed ZeRO 1/2/3 on CPU, or the reference.

Launched by tests/test_deepspeed_zero.py (pytest never collects it: no ``test_`` prefix):

    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_zero.py --model DIR --stage 2 --out DIR
    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_zero.py --model DIR --stage 2 \
        --offload --out DIR
    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_zero.py --model DIR --stage 3 \
        --resume DIR/run/checkpoint-2 --out DIR2
    accelerate launch --config_file ds_zero2.yaml tests/_dist_workers/deepspeed_zero.py --model DIR --stage 2 \
        --launcher-config --out DIR
    python tests/_dist_workers/deepspeed_zero.py --model DIR --out DIR     # the 1-process reference, no DeepSpeed
    torchrun --standalone --nproc_per_node=2 tests/_dist_workers/deepspeed_zero.py --zero-redundancy --out DIR

The model (a tiny Llama, hidden 35, intermediate 70, head_dim 6, saved by the test) is loaded with
``from_pretrained``, so under ZeRO-3 it is built inside ``deepspeed.zero.Init`` as real runs build it. Rank 0
writes ``DIR/result.pt``: full weights, every rank's folded moments and partition records, losses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # 2 ranks share 2 cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hf_fixtures, _helpers

# Ragged last blocks everywhere (35 = 4*8 + 3, 70 = 8*8 + 6 = 4*16 + 6) and per-module block sizes.
OPTIM_ARGS = "block_size=8,block_sizes=down_proj:16;k_proj:4"


def save_tiny_llama(path: str) -> None:
    """Odd widths, so that ZeRO's partition boundaries cut rows and blocks (see tests/test_deepspeed_zero.py)."""
    from hf_fixtures import RANK_SEQ, RANK_VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=RANK_VOCAB,
        hidden_size=35,
        intermediate_size=70,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=6,  # RoPE needs an even head dimension; q_proj is then (30, 35), o_proj (35, 30)
        max_position_embeddings=RANK_SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def ds_config(stage: int, offload: bool, bf16: bool = False) -> dict:
    zero: dict = {"stage": stage}
    config: dict = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto" if bf16 else False},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # else FOAM is swapped for DeepSpeedCPUAdam
    return config


def folded_names(model, args) -> list[str]:
    """Names of the tensors that fold, in the order ZeroFOAM gives them groups (the Trainer's groups, split)."""
    from _helpers import _shape_of

    from foam_hf.folding import is_foldable
    from foam_hf.integration.transformers import optimizer_cls_and_kwargs

    names = {id(p): n for n, p in model.named_parameters()}
    order = []
    for group in optimizer_cls_and_kwargs(args, model)[1]["params"]:
        for p in group["params"]:
            if is_foldable(torch.empty(_shape_of(p), device="meta"), group["block_size"]):
                order.append(names[id(p)])
    return order


def zero_states(foam, names: list[str], into: dict) -> None:
    """Record into ``into`` this rank's folded moments per tensor name (first global block, local moments, partition
    record), for the folded groups that hold their partition now; ``foam`` must show all its groups (ZeRO-1/2 show
    one at a time while they step)."""
    from foam_hf.zero import FULL_SHAPE_KEY, PARTITION_KEY

    folded = [g for g in foam.param_groups if FULL_SHAPE_KEY in g]
    if len(folded) != len(names):
        return
    for name, group in zip(names, folded):
        if len(group["params"]) != 1:  # ZeRO-3 fills a group's params only while it steps that group
            continue
        (param,) = group["params"]
        layout = foam._layout(0, group)
        state = foam.state[param]
        into[name] = {
            "full_shape": tuple(group[FULL_SHAPE_KEY]),
            "block_size": group["block_size"],
            "partition": dict(group[PARTITION_KEY]),
            "first_block": layout.first_block,
            "exp_avg": state["exp_avg"].clone(),
            "exp_avg_sq": state["exp_avg_sq"].clone(),
        }


def trainer_run(args) -> dict:
    from _helpers import STEP_FUNCTIONS
    from hf_fixtures import TokenRows, rank_training_args, unwrap_foam
    from transformers import LlamaForCausalLM, Trainer

    import foam_hf  # noqa: F401  (registers optim="foam")

    fused_calls = []
    module, attribute = STEP_FUNCTIONS["_fused_foam"]
    original = getattr(module, attribute)

    def counting(params, *rest, **kwargs):  # records that the fused CPU kernel stepped the partitions' pieces
        fused_calls.append(len(params))
        return original(params, *rest, **kwargs)

    setattr(module, attribute, counting)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    training_args = rank_training_args(
        os.path.join(args.out, "run"),
        optim_args=OPTIM_ARGS,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        save_only_model=False,
        bf16=args.bf16,
        # --launcher-config: the DeepSpeed config comes from `accelerate launch` (its DeepSpeed plugin) instead.
        deepspeed=ds_config(args.stage, args.offload, args.bf16)
        if args.stage is not None and not args.launcher_config
        else None,
    )
    model = LlamaForCausalLM.from_pretrained(args.model)  # inside zero.Init under ZeRO-3 (transformers does it)
    built_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())  # zero.Init marks what it built
    names = folded_names(model, training_args) if args.stage is not None else []
    # ZeRO-3 fills ZeroFOAM's param groups only while it steps them (they are empty between steps): the states are
    # read inside step(), through torch's public hook on every optimizer's step.
    stepped_states: dict = {}

    def keep_states(optimizer, *_):
        if type(optimizer).__name__ == "ZeroFOAM":
            zero_states(optimizer, names, into=stepped_states)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(keep_states)
    trainer = Trainer(model=model, args=training_args, train_dataset=TokenRows())
    trainer.train(resume_from_checkpoint=args.resume)
    hook.remove()
    foam = unwrap_foam(trainer.optimizer)
    named = list(trainer.model.named_parameters())
    if args.stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            params = {n: p.detach().clone() for n, p in named}
    else:
        params = {n: p.detach().clone() for n, p in named}
    result = {
        "optimizer": type(foam).__name__,
        "params": params,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "steps": trainer.state.global_step,
        "fused_calls": fused_calls,
        "built_partitioned": built_partitioned,
    }
    if args.stage is None:  # the reference: full folded moments per name
        result["exp_avg"] = {n: foam.state[p]["exp_avg"].clone() for n, p in named}
        result["exp_avg_sq"] = {n: foam.state[p]["exp_avg_sq"].clone() for n, p in named}
    else:
        mine = dict(stepped_states)
        zero_states(foam, names, into=mine)  # ZeRO-1/2: after training, every group holds its partition
        assert set(mine) == set(names), sorted(set(names) - set(mine))
        mine["__held_bytes__"] = foam.held_state_bytes()
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
        result["ranks"] = ranks
        # Bytes predicted from the groups alone, to hold the measured bytes to (see state_bytes_per_rank).
        from foam_hf.integration.transformers import optimizer_cls_and_kwargs
        from foam_hf.zero import ZeroFOAM, state_bytes_per_rank

        with torch.device("meta"):  # shapes only
            fresh = LlamaForCausalLM(model.config)
        predicted = ZeroFOAM(**optimizer_cls_and_kwargs(training_args, fresh)[1])
        result["predicted_bytes"] = state_bytes_per_rank(predicted, world, args.stage)
        result["is_deepspeed_enabled"] = trainer.is_deepspeed_enabled
        ds_optimizer = trainer.model_wrapped.optimizer
        says = [getattr(ds_optimizer, a) for a in ("cpu_offload", "offload_optimizer") if hasattr(ds_optimizer, a)]
        assert says, (
            "tests: DeepSpeed's ZeRO optimizer no longer says whether it offloads (cpu_offload, offload_optimizer)"
        )
        result["offloaded"] = any(bool(flag) for flag in says)
    return result if trainer.accelerator.is_main_process else None


def zero_redundancy_run(args) -> dict | None:
    """``ZeroRedundancyOptimizer(optimizer_class=FOAM)`` over DDP, against one-process FOAM on the whole batch."""
    import torch.distributed as dist
    from hf_fixtures import GLOBAL_BATCH
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from foam_hf import FOAM

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(35, 70), torch.nn.Tanh(), torch.nn.Linear(70, 36))

    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, block_size=8)
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(GLOBAL_BATCH, 35, generator=gen), torch.randn(GLOBAL_BATCH, 36, generator=gen)) for _ in range(4)
    ]
    reference = model()
    single = FOAM(reference.parameters(), **kwargs)
    ddp = torch.nn.parallel.DistributedDataParallel(model())
    sharded = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=FOAM, **kwargs)
    half = GLOBAL_BATCH // world
    for x, y in data:
        single.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        single.step()
        sharded.zero_grad()
        torch.nn.functional.mse_loss(
            ddp(x[rank * half : (rank + 1) * half]), y[rank * half : (rank + 1) * half]
        ).backward()
        sharded.step()
    local = {tuple(p.shape): tuple(s["exp_avg"].shape) for p, s in sharded.optim.state.items()}
    shapes = [None] * world
    dist.all_gather_object(shapes, local)
    return (
        {
            "params": [p.detach().clone() for p in ddp.module.parameters()],
            "reference": [p.detach().clone() for p in reference.parameters()],
            "local_exp_avg_shapes": shapes,
        }
        if rank == 0
        else None
    )


def main() -> None:
    from hf_fixtures import end_rank

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="directory of the saved tiny Llama")
    parser.add_argument("--stage", type=int, default=None, help="ZeRO stage; omitted: no DeepSpeed (the reference)")
    parser.add_argument("--offload", action="store_true", help="offload_optimizer: cpu")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    parser.add_argument("--zero-redundancy", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 training (ZeRO-1 then uses BF16_Optimizer)")
    parser.add_argument(
        "--launcher-config",
        action="store_true",
        help="take the DeepSpeed config from accelerate launch (--stage: its stage)",
    )
    args = parser.parse_args()
    result = zero_redundancy_run(args) if args.zero_redundancy else trainer_run(args)
    if result is not None:
        torch.save(result, os.path.join(args.out, "result.pt"))
    end_rank()  # not a plain return: see hf_fixtures.end_rank


if __name__ == "__main__":
    main()
