"""Shared pytest setup: keep Hugging Face libraries offline so no test reaches the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

from tar_lightning.data.world import WorldConfig, generate_world  # noqa: E402
from tar_lightning.models import LlamaSize, build_llama, load_tokenizer, save_model  # noqa: E402

TINY_WORLD = WorldConfig(seed=1, eval_organisms=5, adversary_organisms=3, tamper_resistance_organisms=2, eval_cities=4, extra_cities=1)
TINY_LLAMA = LlamaSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny built-in world and two saved, randomly initialised models of it: ``model_a`` and ``model_b``."""
    root = tmp_path_factory.mktemp("tiny_run")
    generate_world(TINY_WORLD, root / "world")
    tokenizer = load_tokenizer(root / "world" / "tokenizer")
    for seed, name in enumerate(("model_a", "model_b")):
        save_model(build_llama(TINY_LLAMA, tokenizer, seed=seed), tokenizer, root / name)
    return root
