"""Tests of the attacker distribution: kinds by weight, learning rates and switch steps."""

import math
from collections import Counter

import numpy as np
import pytest

from tar_lightning.adversaries import (
    AdversaryConfig,
    SampledAdversary,
    default_adversaries,
    sample_adversary,
    sample_switch_step,
)


def test_sample_switch_step_is_floor_of_beta_draw():
    rng = np.random.default_rng(7)
    reference = np.random.default_rng(7)

    for _ in range(50):
        expected = math.floor(reference.beta(6.0, 3.0) * 16)
        assert sample_switch_step(16, 6.0, 3.0, rng) == expected


def test_sample_switch_step_mean():
    rng = np.random.default_rng(0)
    inner_steps = 1000
    draws = np.array([sample_switch_step(inner_steps, 6.0, 3.0, rng) for _ in range(20000)])

    # Beta(6, 3) has mean 6/9 and standard deviation about 0.149, so the standard error of
    # the mean of 20000 draws is about 0.001 and flooring lowers it by under 1 / inner_steps.
    assert draws.mean() / inner_steps == pytest.approx(6 / 9, abs=0.005)


def test_sample_switch_step_range():
    rng = np.random.default_rng(1)
    draws = [sample_switch_step(16, 6.0, 3.0, rng) for _ in range(5000)]

    assert min(draws) >= 0
    assert max(draws) <= 15
    # Beta(6, 3) has density zero at both ends, so small switch steps are rare.
    assert sum(d < 4 for d in draws) / len(draws) < 0.02


def test_sample_adversary_tiny_weight_is_rare():
    adversaries = [AdversaryConfig(name="rare", weight=1e-4), AdversaryConfig(name="common", weight=1.0)]
    rng = np.random.default_rng(0)

    counts = Counter(sample_adversary(adversaries, 8, rng).index for _ in range(2000))

    # About 0.2 draws of the rare kind are expected.
    assert counts[0] <= 3
    assert counts[1] >= 1997


def test_sample_adversary_frequency_follows_weights():
    adversaries = [AdversaryConfig(name="a", weight=1.0), AdversaryConfig(name="b", weight=3.0)]
    rng = np.random.default_rng(0)
    draws = 4000

    counts = Counter(sample_adversary(adversaries, 8, rng).index for _ in range(draws))

    # The standard error of the frequency is about 0.007.
    assert counts[1] / draws == pytest.approx(0.75, abs=0.03)


def test_sample_adversary_learning_rate_from_list():
    config = AdversaryConfig(learning_rates=[1e-3, 2e-3, 4e-3])
    rng = np.random.default_rng(0)

    drawn = Counter(sample_adversary([config], 8, rng).learning_rate for _ in range(300))

    assert set(drawn) == {1e-3, 2e-3, 4e-3}
    assert all(count > 50 for count in drawn.values())


def test_switch_step_only_when_switching():
    rng = np.random.default_rng(0)
    plain = AdversaryConfig(retain_then_forget=False)
    retain_then_forget = AdversaryConfig(retain_then_forget=True)

    plain_steps = {sample_adversary([plain], 16, rng).switch_step for _ in range(100)}
    switching_steps = {sample_adversary([retain_then_forget], 16, rng).switch_step for _ in range(100)}

    assert plain_steps == {0}
    assert len(switching_steps) > 1
    assert all(0 <= step < 16 for step in switching_steps)


def test_horizons_drawn_per_adversary():
    rng = np.random.default_rng(0)
    sampled = [sample_adversary([AdversaryConfig(retain_then_forget=True, horizons=[4, 32])], 16, rng) for _ in range(200)]
    fixed = sample_adversary([AdversaryConfig()], 16, rng)

    assert {adversary.steps for adversary in sampled} == {4, 32}
    assert all(adversary.switch_step < adversary.steps for adversary in sampled)
    assert max(adversary.switch_step for adversary in sampled) >= 16
    assert fixed.steps == 16


def test_source_at_switches_from_retain_to_forget():
    config = AdversaryConfig(forget_source="forget_a", retain_source="retain", retain_then_forget=True)
    adversary = SampledAdversary(index=0, config=config, learning_rate=1e-3, switch_step=5, steps=8)

    assert [adversary.source_at(step) for step in range(8)] == ["retain"] * 5 + ["forget_a"] * 3


def test_source_at_without_switch_is_forget():
    config = AdversaryConfig(forget_source="forget_b", retain_then_forget=False)
    adversary = SampledAdversary(index=0, config=config, learning_rate=1e-3, switch_step=5, steps=8)

    assert {adversary.source_at(step) for step in range(8)} == {"forget_b"}


def test_learning_rate_at_linear_warmup():
    config = AdversaryConfig(schedule="linear_warmup", warmup_steps=4)
    adversary = SampledAdversary(index=0, config=config, learning_rate=0.1, switch_step=0, steps=8)

    rates = [adversary.learning_rate_at(step) for step in range(7)]

    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])


def test_learning_rate_at_constant():
    config = AdversaryConfig(schedule="constant", warmup_steps=4)
    adversary = SampledAdversary(index=0, config=config, learning_rate=0.1, switch_step=0, steps=8)

    assert [adversary.learning_rate_at(step) for step in range(5)] == [0.1] * 5


def test_validate_unknown_source_names_key():
    config = AdversaryConfig(forget_source="forget_c")

    problems = config.validate("model.adversaries.1", {"forget_a", "retain"})

    assert len(problems) == 1
    assert "model.adversaries.1" in problems[0]
    assert "'forget_c'" in problems[0]
    assert "['forget_a', 'retain']" in problems[0]


def test_validate_retain_source_only_when_switching():
    sources = {"forget_a"}

    assert AdversaryConfig(retain_source="missing", retain_then_forget=False).validate("adv", sources) == []
    problems = AdversaryConfig(retain_source="missing", retain_then_forget=True).validate("adv", sources)
    assert len(problems) == 1
    assert "'missing'" in problems[0]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"weight": 0.0}, "adv.weight"),
        ({"learning_rates": []}, "adv.learning_rates"),
        ({"learning_rates": [1e-3, -1e-3]}, "adv.learning_rates"),
        ({"batch_size": 0}, "adv.batch_size"),
        ({"schedule": "linear_warmup", "warmup_steps": 0}, "adv.warmup_steps"),
        ({"switch_alpha": 0.0}, "adv.switch_alpha"),
        ({"switch_beta": -1.0}, "switch_beta"),
        ({"horizons": []}, "adv.horizons"),
        ({"horizons": [16, 0]}, "adv.horizons"),
    ],
)
def test_validate_bad_value(changes, field):
    problems = AdversaryConfig(**changes).validate("adv")

    assert len(problems) == 1
    assert field in problems[0]


def test_default_adversaries_are_valid():
    adversaries = default_adversaries()

    for i, config in enumerate(adversaries):
        assert config.validate(f"adv.{i}", {"forget_a", "forget_b", "retain"}) == []
    assert [config.retain_then_forget for config in adversaries] == [False, False, True]
    assert {config.forget_source for config in adversaries} == {"forget_a", "forget_b"}


def test_validate_lora_settings():
    problems = AdversaryConfig(lora_rank=-1).validate("model.adversaries[0]")
    assert problems == ["model.adversaries[0].lora_rank must be 0 (every weight) or positive, got -1"]

    problems = AdversaryConfig(lora_rank=4, lora_targets=[]).validate("model.adversaries[0]")
    assert len(problems) == 1
    assert "needs a positive lora_alpha and at least one of lora_targets" in problems[0]


def test_low_rank_only_for_lora_adversaries():
    assert AdversaryConfig().low_rank() is None
    low_rank = AdversaryConfig(lora_rank=8, lora_alpha=16.0, lora_targets=["q_proj.weight"]).low_rank()
    assert (low_rank.rank, low_rank.alpha, low_rank.targets) == (8, 16.0, ("q_proj.weight",))
