"""Per-module block sizes, from Python (``FoamConfig``) or from the command line (``HfArgumentParser``).

From Python (no ``--optim`` given; the script builds a ``foam_hf.FoamConfig`` and passes
``config.to_optim_args()`` to ``TrainingArguments``)::

    python examples/per_module_block_sizes.py --short

From the command line (every ``TrainingArguments`` flag works, as in any HF training script)::

    python examples/per_module_block_sizes.py --short --optim foam \\
        --optim_args "block_size=4,block_sizes=q_proj:8;v_proj:1;lm_head:32" --max_steps 5

Prints the block size the optimizer resolved for every trainable parameter, with the shape of its
folded states (``v_proj:1`` keeps AdamW states; ``lm_head:32`` folds the head, which, like the embeddings, is
unfolded by default). With ``--max_steps N`` it then trains N steps. Returns the
``{parameter name: block size}`` map read back from the optimizer's param groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import block_dataset, load_model_and_tokenizer, stdlib_texts, unwrap_optimizer  # noqa: E402

#: What the Python route asks for: B=4 by default, 8 for attention queries, 16 for the MLP down
#: projection, and AdamW states (1) for the attention values.
PYTHON_BLOCK_SIZES = {"q_proj": 8, "down_proj": 16, "v_proj": 1}


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a model directory for from_pretrained; default: a tiny Llama"}
    )
    short: bool = field(default=False, metadata={"help": "test-sized model: seconds on a CPU"})


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser, Trainer, TrainingArguments

    import foam_hf  # registers optim="foam" (also for HfArgumentParser's --optim choices)
    from foam_hf.folding import folded_shape, is_foldable
    from foam_hf.integration.transformers import is_foam_optim

    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    if is_foam_optim(training_args.optim):
        route = "command line"
    elif training_args.optim_args:
        raise SystemExit(
            f"--optim_args {training_args.optim_args!r} without --optim foam: this script's Python route would put "
            "its own FoamConfig over them. Fix: add --optim foam to train with your optim_args, or drop them to see "
            "the Python route."
        )
    else:
        route = "python"
        config = foam_hf.FoamConfig(block_size=4, block_sizes=PYTHON_BLOCK_SIZES)
        print(f"from Python: {config!r}\n  -> optim_args={config.to_optim_args()!r}")
        # The same as writing TrainingArguments(..., optim="foam", optim_args=config.to_optim_args()).
        training_args = dataclasses.replace(training_args, optim="foam", optim_args=config.to_optim_args())
    print(f"optim={training_args.optim.value!r} optim_args={training_args.optim_args!r} ({route})")

    model, tokenizer = load_model_and_tokenizer(
        argparse.Namespace(model_name_or_path=script_args.model_name_or_path, short=script_args.short, seed=0)
    )
    rows = max(training_args.max_steps, 1) * training_args.per_device_train_batch_size
    data = block_dataset(tokenizer, stdlib_texts(max_files=8), seq_len=32, max_rows=rows)
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    trainer.create_optimizer()
    optimizer = unwrap_optimizer(trainer.optimizer)

    group_of = {id(p): g["block_size"] for g in optimizer.param_groups for p in g["params"]}
    block_sizes = {n: group_of[id(p)] for n, p in model.named_parameters() if id(p) in group_of}
    params = dict(model.named_parameters())
    width = max(map(len, block_sizes))
    print(f"\n{'parameter':<{width}}  {'shape':>12}  {'B':>3}  {'state shape':>12}")
    for name, size in block_sizes.items():
        shape = params[name].shape
        state = tuple(folded_shape(shape, size)) if is_foldable(params[name], size) else tuple(shape)
        print(f"{name:<{width}}  {str(tuple(shape)):>12}  {size:>3}  {str(state):>12}")
    memory = foam_hf.state_memory(optimizer)
    print(f"\noptimizer state {memory.foam_bytes:,} bytes; AdamW would hold {memory.adamw_bytes:,}")

    if training_args.max_steps > 0:
        trainer.train()
    return dict(route=route, optim_args=training_args.optim_args, block_sizes=block_sizes, model=model, trainer=trainer)


if __name__ == "__main__":
    main()
