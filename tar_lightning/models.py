"""Build, load and save causal language models in Hugging Face format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


@dataclass
class LlamaSize:
    """Shape of a small Llama built from a config for the built-in world.

    Args:
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        num_heads: Attention heads per layer (key-value heads are the same number).
        intermediate_size: Width of each MLP.
        max_position_embeddings: Maximum sequence length the rotary embedding is set up for.
        tie_word_embeddings: Share one matrix between the input embedding and the output head.
    """

    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False


def build_llama(size: LlamaSize, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """Return a freshly initialised ``LlamaForCausalLM`` sized for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=size.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_causal_lm(path: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Load a causal LM from a local Hugging Face directory or a hub name, in training mode."""
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=dtype)
    model.train()
    return model


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved next to a model; pad with EOS when the tokenizer has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_model(model, tokenizer, path: str | Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` under ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def is_saved_model(path: str | Path) -> bool:
    """Return whether ``path`` contains a complete saved model (config and weights)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
