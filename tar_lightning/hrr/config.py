"""Typed configuration of the harmful-request-refusal (HRR) stages, under ``pipeline.hrr``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tar_lightning.data.instructions import InstructionWorldConfig
from tar_lightning.evaluation.attacks import AttackConfig
from tar_lightning.finetune import FinetuneConfig

# Corpora of the instruction world that attacks and training adversaries can train on, by
# name -> file stem in the world directory.
REFUSAL_ATTACK_SOURCES = {"harmful": "hrr_adversary_harmful", "benign": "hrr_benign_retain"}


def _default_refusal_training() -> FinetuneConfig:
    return FinetuneConfig(optimizer="adamw", learning_rate=5e-4, steps=1000, batch_size=32, schedule="warmup_cosine", warmup_steps=50)


def default_refusal_attacks() -> list[AttackConfig]:
    """SFT on harmful completions with varied optimizer, learning rate, batch size and warmup.

    The authors attack with 10 epochs of SFT on harmful completions. The built-in world has
    160 harmful-completion rows (40 compounds, 4 requests each), so 10 epochs are 100 steps
    of batch 16; the other attacks keep about 10 to 20 epochs.
    """
    return [
        AttackConfig(name="adamw_10_epochs", optimizer="adamw", learning_rate=1e-3, steps=100, batch_size=16, data="harmful"),
        AttackConfig(
            name="adamw_low_lr_warmup",
            optimizer="adamw",
            learning_rate=3e-4,
            steps=100,
            batch_size=32,
            data="harmful",
            schedule="linear_warmup",
            warmup_steps=20,
        ),
        AttackConfig(
            name="adam_cosine",
            optimizer="adam",
            learning_rate=2e-3,
            steps=200,
            batch_size=8,
            data="harmful",
            schedule="warmup_cosine",
            warmup_steps=20,
        ),
        AttackConfig(name="sgd_momentum", optimizer="sgd_momentum", learning_rate=1e-2, steps=100, batch_size=16, data="harmful"),
    ]


@dataclass
class RefusalTrainingConfig:
    """The initial safeguard of HRR: SFT of the pretrained model on benign answers and refusals.

    Args:
        training: Optimizer, schedule and length.
        pretrain_fraction: Share of each batch drawn from the pretraining text, so that the
            facts of held-out cities stay sharp while the model learns the chat format.
        seed: Seed of batch sampling.
    """

    training: FinetuneConfig = field(default_factory=_default_refusal_training)
    pretrain_fraction: float = 0.25
    seed: int = 0


@dataclass
class RefusalEvaluationConfig:
    """Attacks and scoring of the HRR models.

    Args:
        attacks: Fine-tuning attacks, each run from a fresh copy of the refusal-trained and
            the TAR model; ``data`` names a corpus of ``REFUSAL_ATTACK_SOURCES``.
        seeds: Attack seeds; post-attack figures are means over them.
        batch_size: Prompts per generation batch.
        max_new_tokens: Length limit of each greedy response.
        score_pretrained: Also score the pretrained model (no refusal training) before attack.
    """

    attacks: list[AttackConfig] = field(default_factory=default_refusal_attacks)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 256
    max_new_tokens: int = 32
    score_pretrained: bool = True


@dataclass
class HRRConfig:
    """Stages of the harmful-request-refusal objective; used when ``pipeline.objective`` is ``hrr``.

    Args:
        world: Instruction data added to the built-in world.
        refusal_training: Refusal training of the pretrained model (the initial safeguard).
        evaluation: Attacks and scoring.
    """

    world: InstructionWorldConfig = field(default_factory=InstructionWorldConfig)
    refusal_training: RefusalTrainingConfig = field(default_factory=RefusalTrainingConfig)
    evaluation: RefusalEvaluationConfig = field(default_factory=RefusalEvaluationConfig)

    def validate(self, key: str, world_cities: int) -> list[str]:
        """Return every problem of this config, each naming its dotted key."""
        problems = self.world.validate(f"{key}.world", world_cities)
        problems += self.refusal_training.training.validate(f"{key}.refusal_training.training")
        if not 0.0 <= self.refusal_training.pretrain_fraction < 1.0:
            problems.append(f"{key}.refusal_training.pretrain_fraction must be in [0, 1), got {self.refusal_training.pretrain_fraction}")
        evaluation = self.evaluation
        if not evaluation.seeds:
            problems.append(f"{key}.evaluation.seeds must list at least one seed")
        if evaluation.batch_size < 1:
            problems.append(f"{key}.evaluation.batch_size must be at least 1, got {evaluation.batch_size}")
        if evaluation.max_new_tokens < 1:
            problems.append(f"{key}.evaluation.max_new_tokens must be at least 1, got {evaluation.max_new_tokens}")
        names = [a.name for a in evaluation.attacks]
        if len(set(names)) != len(names):
            problems.append(f"{key}.evaluation.attacks names must be unique, got {names}")
        for i, attack in enumerate(evaluation.attacks):
            problems += attack.validate(f"{key}.evaluation.attacks[{i}]", set(REFUSAL_ATTACK_SOURCES))
        return problems
