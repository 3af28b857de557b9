"""Fine-tuning attacks on saved models, each from a fresh copy of the evaluated weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tar_lightning.data.sources import TokenPool
from tar_lightning.finetune import FinetuneConfig, finetune
from tar_lightning.models import load_causal_lm


@dataclass
class AttackConfig(FinetuneConfig):
    """A supervised fine-tuning attack.

    Args:
        name: Label in the report.
        data: Corpus the attacker trains on (a key of the adversary corpora).
        retain_data: Corpus of the first ``retain_fraction`` of the steps.
        retain_fraction: Share of steps, from the start, spent on ``retain_data``
            (retain-then-forget attacks); 0 trains on ``data`` throughout.
        held_out: Whether tamper-resistance training never saw an attack of this kind.
    """

    name: str = "attack"
    data: str = "forget_a"
    retain_data: str = "retain"
    retain_fraction: float = 0.0
    held_out: bool = True

    def validate(self, key: str, sources: set[str] | None = None) -> list[str]:
        problems = super().validate(key)
        if not 0.0 <= self.retain_fraction < 1.0:
            problems.append(f"{key}.retain_fraction must be in [0, 1), got {self.retain_fraction}")
        if sources is not None:
            used = [self.data] + ([self.retain_data] if self.retain_fraction > 0 else [])
            for source in used:
                if source not in sources:
                    problems.append(f"{key} uses data {source!r}, which is not one of {sorted(sources)}")
        return problems


def run_attack(
    model_path: str,
    attack: AttackConfig,
    pools: dict[str, TokenPool],
    seed: int,
    device: torch.device,
    progress: bool = True,
):
    """Load a fresh copy of ``model_path``, fine-tune it with ``attack`` and return it with its losses.

    The saved model is only read, never written.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = load_causal_lm(model_path).to(device)
    switch = int(attack.retain_fraction * attack.steps)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        source = attack.retain_data if step < switch else attack.data
        return pools[source].sample(attack.batch_size, generator)

    losses = finetune(model, next_batch, attack, description=f"attack {attack.name} seed {seed}", progress=progress)
    return model, losses
