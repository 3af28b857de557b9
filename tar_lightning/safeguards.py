"""Initial safeguards applied before tamper-resistance training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tar_lightning.losses import next_token_loss, random_mapping_loss


@dataclass
class RandomMappingConfig:
    """Random Mapping: push forget-text hidden states toward fixed random directions.

    Args:
        steps: Optimizer steps (AdamW).
        learning_rate: AdamW learning rate.
        batch_size: Sequences of forget text and of retain text per step.
        retain_weight: Weight of the next-token loss on retain text.
        seed: Seed of the random table R (vocab x hidden).
    """

    steps: int = 200
    learning_rate: float = 1e-3
    batch_size: int = 32
    retain_weight: float = 1.0
    seed: int = 0

    def validate(self, key: str) -> list[str]:
        """Return every problem of this config, each naming its dotted key."""
        problems = []
        if self.steps < 1:
            problems.append(f"{key}.steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            problems.append(f"{key}.learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1:
            problems.append(f"{key}.batch_size must be at least 1, got {self.batch_size}")
        return problems


def apply_random_mapping(
    model: torch.nn.Module,
    next_forget: Callable[[], dict[str, torch.Tensor]],
    next_retain: Callable[[], dict[str, torch.Tensor]],
    config: RandomMappingConfig,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with the Random Mapping safeguard; return the loss of each step.

    On forget text, every hidden-state layer (embedding output included) is pulled toward the
    token's row of a fixed Gaussian table R, with loss ``1 - |cos(h, R[token])|``. At the same
    time, next-token loss on retain text keeps general ability.
    """
    generator = torch.Generator().manual_seed(config.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    table = torch.randn(vocab, model.config.hidden_size, generator=generator)
    device = next(model.parameters()).device
    table = table.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="random mapping", leave=False, disable=not progress, dynamic_ncols=True)
    with torch.enable_grad():
        for step in bar:
            forget = {k: v.to(device) for k, v in next_forget().items()}
            retain = {k: v.to(device) for k, v in next_retain().items()}
            hidden = model(**forget, output_hidden_states=True, use_cache=False).hidden_states
            mapping = random_mapping_loss(hidden, forget["input_ids"], forget["attention_mask"], table)
            logits = model(**retain, use_cache=False).logits
            retain_loss = next_token_loss(logits, retain["input_ids"], retain["attention_mask"])
            loss = mapping + config.retain_weight * retain_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(mapping=f"{mapping.item():.3f}", retain=f"{retain_loss.item():.3f}")
    bar.close()
    return losses
