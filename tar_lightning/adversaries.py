"""The distribution of simulated attackers that tamper-resistance training samples from.

Each outer step draws one adversary: a kind (by weight), a learning rate, optionally a
horizon (its number of inner steps K), and for
retain-then-forget adversaries a switch step M = floor(u * K) with u ~ Beta(6, 3), as in
"Tamper-Resistant Safeguards for Open-Weight LLMs": retain data before step M, forget data
from M on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tar_lightning.inner_loop import InnerOptimizerName, LowRankAdversary


@dataclass
class AdversaryConfig:
    """One kind of simulated attacker.

    Args:
        name: Label used in logs.
        weight: Relative probability of drawing this adversary.
        forget_source: Adversary data source (a key of ``data.adversary``) with forget-domain text.
        retain_source: Data source used before the switch step when ``retain_then_forget`` is set.
        retain_then_forget: Train on ``retain_source`` until a switch step drawn from
            Beta(``switch_alpha``, ``switch_beta``) times K, then on ``forget_source``.
        learning_rates: The learning rate is drawn uniformly from this list each outer step.
        horizons: The number of inner steps is drawn uniformly from this list each outer
            step; ``null`` uses ``model.inner_steps``. Each horizon must be at least
            ``model.tr_every``, so that the attacked weights are scored at least once.
        optimizer: Inner optimizer: ``adamw``, ``adam`` or ``sgd_momentum``.
        schedule: ``constant``, or ``linear_warmup`` (learning rate rising linearly over the
            first ``warmup_steps`` steps, then constant).
        warmup_steps: Warmup length for ``linear_warmup``.
        batch_size: Sequences per inner step.
        switch_alpha: First Beta parameter of the switch step.
        switch_beta: Second Beta parameter of the switch step.
        lora_rank: Train functional LoRA factors of this rank instead of every weight; 0
            attacks every weight.
        lora_alpha: LoRA scale numerator; updates are scaled by lora_alpha / lora_rank.
        lora_targets: Suffixes of the parameter names that get LoRA updates.
    """

    name: str = "forget_a"
    weight: float = 1.0
    forget_source: str = "forget_a"
    retain_source: str = "retain"
    retain_then_forget: bool = False
    learning_rates: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 2e-3])
    horizons: list[int] | None = None
    optimizer: InnerOptimizerName = "adamw"
    schedule: Literal["constant", "linear_warmup"] = "constant"
    warmup_steps: int = 0
    batch_size: int = 32
    switch_alpha: float = 6.0
    switch_beta: float = 3.0
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: list(LowRankAdversary.targets))

    def low_rank(self) -> LowRankAdversary | None:
        """Return the functional LoRA update of this adversary, or ``None`` for a full-parameter one."""
        if self.lora_rank == 0:
            return None
        return LowRankAdversary(self.lora_rank, self.lora_alpha, tuple(self.lora_targets))

    def validate(self, key: str, sources: set[str] | None = None) -> list[str]:
        """Return every problem of this config, each naming its dotted key."""
        problems = []
        if not self.weight > 0:
            problems.append(f"{key}.weight must be positive, got {self.weight}")
        if not self.learning_rates or any(not lr > 0 for lr in self.learning_rates):
            problems.append(f"{key}.learning_rates must be a non-empty list of positive numbers, got {self.learning_rates}")
        if self.horizons is not None and (not self.horizons or any(k < 1 for k in self.horizons)):
            problems.append(f"{key}.horizons must be null or a non-empty list of positive step counts, got {self.horizons}")
        if self.batch_size < 1:
            problems.append(f"{key}.batch_size must be at least 1, got {self.batch_size}")
        if self.schedule == "linear_warmup" and self.warmup_steps < 1:
            problems.append(f"{key}.warmup_steps must be at least 1 with schedule linear_warmup, got {self.warmup_steps}")
        if self.lora_rank < 0:
            problems.append(f"{key}.lora_rank must be 0 (every weight) or positive, got {self.lora_rank}")
        if self.lora_rank > 0 and (not self.lora_alpha > 0 or not self.lora_targets):
            problems.append(f"{key}: a LoRA adversary needs a positive lora_alpha and at least one of lora_targets")
        if self.switch_alpha <= 0 or self.switch_beta <= 0:
            problems.append(f"{key}.switch_alpha and switch_beta must be positive")
        if sources is not None:
            used = [self.forget_source] + ([self.retain_source] if self.retain_then_forget else [])
            for source in used:
                if source not in sources:
                    problems.append(f"{key} uses data source {source!r}, which is not in data.adversary {sorted(sources)}")
        return problems


@dataclass
class SampledAdversary:
    """One attacker drawn for one outer step.

    Attributes:
        index: Position of its config in the adversary list.
        config: The adversary kind.
        learning_rate: Peak learning rate drawn from ``config.learning_rates``.
        switch_step: First step on forget data for retain-then-forget adversaries, else 0.
        steps: K, the number of inner steps of this attack.
    """

    index: int
    config: AdversaryConfig
    learning_rate: float
    switch_step: int
    steps: int

    def source_at(self, step: int) -> str:
        """Data source of 0-based inner step ``step``."""
        if self.config.retain_then_forget and step < self.switch_step:
            return self.config.retain_source
        return self.config.forget_source

    def learning_rate_at(self, step: int) -> float:
        """Learning rate of 0-based inner step ``step``."""
        if self.config.schedule == "linear_warmup" and step < self.config.warmup_steps:
            return self.learning_rate * (step + 1) / self.config.warmup_steps
        return self.learning_rate


def sample_switch_step(inner_steps: int, alpha: float, beta: float, rng: np.random.Generator) -> int:
    """Return M = floor(u * inner_steps) with u ~ Beta(alpha, beta)."""
    return math.floor(rng.beta(alpha, beta) * inner_steps)


def sample_adversary(adversaries: list[AdversaryConfig], inner_steps: int, rng: np.random.Generator) -> SampledAdversary:
    """Draw an adversary kind by weight, then its learning rate, horizon and switch step.

    ``inner_steps`` is the horizon of adversaries without ``horizons``.
    """
    weights = np.array([a.weight for a in adversaries], dtype=float)
    index = int(rng.choice(len(adversaries), p=weights / weights.sum()))
    config = adversaries[index]
    learning_rate = float(rng.choice(config.learning_rates))
    # Drawn only when listed, so runs without horizons keep their random stream.
    steps = int(rng.choice(config.horizons)) if config.horizons else inner_steps
    switch_step = 0
    if config.retain_then_forget:
        switch_step = sample_switch_step(steps, config.switch_alpha, config.switch_beta, rng)
    return SampledAdversary(index, config, learning_rate, switch_step, steps)


def default_adversaries() -> list[AdversaryConfig]:
    """Return the authors' mix: one third each of forget corpus A, forget corpus B and retain-then-forget."""
    return [
        AdversaryConfig(name="forget_a", forget_source="forget_a"),
        AdversaryConfig(name="forget_b", forget_source="forget_b"),
        AdversaryConfig(name="retain_then_forget", forget_source="forget_a", retain_then_forget=True),
    ]


def default_refusal_adversaries() -> list[AdversaryConfig]:
    """Return the harmful-request-refusal mix: SFT on harmful completions, half of it after benign chat.

    Both train on the ``harmful`` corpus of harmful completions. The second trains on the
    ``benign`` corpus first, until a switch step drawn from Beta(6, 3) times K.
    """
    return [
        AdversaryConfig(name="harmful_sft", forget_source="harmful", batch_size=16),
        AdversaryConfig(
            name="benign_then_harmful", forget_source="harmful", retain_source="benign", retain_then_forget=True, batch_size=16
        ),
    ]
