"""An unmodified HfArgumentParser training script, as users write them: it never imports foam_hf.

    python hf_train.py --output_dir out --optim foam --optim_args block_size=8 --max_steps 3

Trains a tiny Llama (built from a config) on fixed token ids, then writes into ``output_dir``:
``result.json`` (the optimizer's class, each parameter's moment shapes) and ``w.pt`` (the final weights).

One harness hook, for multi-rank runs on gloo: with ``HF_TRAIN_END_RANK=1`` each rank tears its process group
down and leaves without Python's finalization once its results are written. torch's gloo worker threads can
destroy their last Work while the interpreter finalizes, which aborts a finished rank ("terminate called without
an active exception", SIGABRT) and fails the launch; tests/hf_fixtures.end_rank has the details. Two-rank
launches of this script under torchrun on a 2-core AMD Zen 5 (2026-12-06): 2 of 30 aborted so, 0 of 30 with
the hook.
"""

import json
import os
import sys

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        loader = HfArgumentParser(TrainingArguments)
        reader = loader.parse_json_file if sys.argv[1].endswith(".json") else loader.parse_yaml_file
        (args,) = reader(os.path.abspath(sys.argv[1]))
    else:
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=36,
        intermediate_size=70,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 64, (32, 12), generator=gen).tolist()
    data = [{"input_ids": r, "labels": r} for r in rows]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    optimizer = trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = {
        names[id(p)]: list(optimizer.state[p]["exp_avg"].shape)
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    }
    result = {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "moment_shapes": shapes,
        "world_size": args.world_size,
    }
    if args.process_index == 0:
        with open(os.path.join(args.output_dir, "result.json"), "w") as handle:
            json.dump(result, handle)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(args.output_dir, "w.pt"))
    if os.environ.get("HF_TRAIN_END_RANK") == "1":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: hf_fixtures
        from hf_fixtures import end_rank  # imports transformers and torch only, never foam_hf

        end_rank()


if __name__ == "__main__":
    main()
