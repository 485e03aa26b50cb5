"""Optimizer-state bytes per rank under DeepSpeed ZeRO: AdamW against FOAM (``ZeroFOAM``), from model shapes.

The model is built on the meta device (no weights, no download), the param groups as ``optim="foam"`` builds
them, and the bytes each rank will hold are predicted by :func:`foam_hf.zero.state_bytes_per_rank` (which
``tests/test_deepspeed_zero.py`` holds to the bytes measured in real 2-rank ZeRO runs). Prints a Markdown table.

    python benchmarks/bench_zero_memory.py                      # Llama-2-7B shapes, 8 and 64 ranks
    python benchmarks/bench_zero_memory.py --toy                # the tiny Llama of the tests, 2 ranks
"""

from __future__ import annotations

import argparse

import torch


def llama(toy: bool) -> torch.nn.Module:
    """The tests' tiny Llama, or the Llama-2-7B shapes (``foam-hf memory llama-7b``), on the meta device."""
    from transformers import LlamaConfig

    from foam_hf.tools.memory_report import build_meta_model, load_config

    if toy:
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=35,
            intermediate_size=70,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            head_dim=6,
            max_position_embeddings=16,
            tie_word_embeddings=False,
        )
    else:
        config, _, _ = load_config("llama-7b")
    return build_meta_model(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="the tests' tiny Llama instead of Llama-2-7B shapes")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None)
    args = parser.parse_args()

    from foam_hf import FoamConfig
    from foam_hf.param_groups import build_param_groups, resolve_block_sizes
    from foam_hf.zero import ZeroFOAM, state_bytes_per_rank

    model = llama(args.toy)
    plan = resolve_block_sizes(model, FoamConfig(block_size=args.block_size))
    groups = build_param_groups(model, plan, weight_decay=0.0, decay_parameter_names=[])
    foam = ZeroFOAM(groups, block_size=args.block_size)
    adamw = ZeroFOAM(model.parameters(), block_size=1)  # nothing folds: AdamW's states, partitioned alike
    worlds = args.world_sizes or ([2] if args.toy else [8, 64])
    name = "tiny Llama (tests)" if args.toy else "Llama-2-7B shapes"
    print(f"{name}, block_size={args.block_size}, fp32 states; bytes per rank (the largest rank)\n")
    print("| world | ZeRO stage | AdamW / rank | FOAM / rank | AdamW / FOAM | FOAM, all ranks | FOAM, 1 process |")
    print("|---|---|---|---|---|---|---|")
    one_process = foam.state_memory().foam_bytes
    for world in worlds:
        for stage in (2, 3):
            mine = state_bytes_per_rank(foam, world, stage)
            theirs = state_bytes_per_rank(adamw, world, stage)
            print(
                f"| {world} | {stage} | {max(theirs):,} | {max(mine):,} | {max(theirs) / max(mine):.2f} "
                f"| {sum(mine):,} | {one_process:,} |"
            )


if __name__ == "__main__":
    main()
