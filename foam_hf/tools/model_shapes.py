"""Built-in model shapes for ``foam-hf memory``: the config fields that decide optimizer-state memory, written
out from each model's published config (nothing is downloaded). Data only."""

from __future__ import annotations

from typing import Any

__all__ = ["KNOWN_MODELS"]

#: Built-in architectures: the shapes that decide memory, written out from each model's published config.
#: ``source`` says where the numbers come from. Add a model by copying the shape fields of its config.json.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # The FOAM paper pre-trains the LLaMA configs of the GaLore paper (Zhao et al. 2024, Table 2 / the
    # configs/llama_*.json files of the GaLore code release): vocab 32000, untied embeddings.
    "llama-60m": dict(
        model_type="llama",
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        source="GaLore/FOAM paper LLaMA 60M (GaLore configs/llama_60m.json)",
    ),
    "llama-130m": dict(
        model_type="llama",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=32000,
        tie_word_embeddings=False,
        source="GaLore/FOAM paper LLaMA 130M (GaLore configs/llama_130m.json)",
    ),
    "llama-350m": dict(
        model_type="llama",
        hidden_size=1024,
        intermediate_size=2736,
        num_hidden_layers=24,
        num_attention_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
        source="GaLore/FOAM paper LLaMA 350M (GaLore configs/llama_350m.json)",
    ),
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=5461,
        num_hidden_layers=24,
        num_attention_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        source="GaLore/FOAM paper LLaMA 1B (GaLore configs/llama_1b.json)",
    ),
    "llama-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        source="GaLore/FOAM paper LLaMA 7B (GaLore configs/llama_7b.json)",
    ),
    # Current open models, shape fields of their published config.json files.
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        source="meta-llama/Llama-3.1-8B config.json",
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        source="Qwen/Qwen2.5-0.5B config.json",
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        source="Qwen/Qwen2.5-7B config.json",
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
        tie_word_embeddings=False,
        source="mistralai/Mistral-7B-v0.3 config.json",
    ),
    "gemma-2-2b": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=256000,
        tie_word_embeddings=True,
        source="google/gemma-2-2b config.json",
    ),
}
