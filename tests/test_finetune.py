"""Tests of plain fine-tuning: schedules, config checks, optimizers and the training loop."""

import math

import pytest
import torch

from tar_lightning.data.tokenizer import train_word_tokenizer
from tar_lightning.finetune import FinetuneConfig, finetune, lr_factor, make_optimizer
from tar_lightning.losses import next_token_loss
from tar_lightning.models import LlamaSize, build_llama

SENTENCES = ["the cat sat on the mat .", "a dog ran in the park ."]


def test_lr_factor_constant():
    config = FinetuneConfig(schedule="constant", steps=10, warmup_steps=4)

    assert [lr_factor(step, config) for step in (0, 3, 9)] == [1.0, 1.0, 1.0]


def test_lr_factor_linear_warmup():
    config = FinetuneConfig(schedule="linear_warmup", steps=10, warmup_steps=4)

    factors = [lr_factor(step, config) for step in range(10)]

    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_lr_factor_warmup_cosine():
    config = FinetuneConfig(schedule="warmup_cosine", steps=10, warmup_steps=2)

    # After two warmup steps the cosine runs over the remaining 8 steps.
    assert lr_factor(0, config) == pytest.approx(0.5)
    assert lr_factor(1, config) == pytest.approx(1.0)
    assert lr_factor(2, config) == pytest.approx(1.0)
    assert lr_factor(4, config) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6, config) == pytest.approx(0.5)
    assert lr_factor(9, config) == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))
    assert lr_factor(10, config) == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_sgdr_restarts_each_cycle():
    config = FinetuneConfig(schedule="sgdr", steps=20, warmup_steps=2, restart_steps=4)

    factors = [lr_factor(step, config) for step in range(2, 12)]

    # Cycles of 4 steps after the warmup: 1, cos^2 quarter points, then back to the peak.
    cycle = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert factors == pytest.approx(cycle + cycle + cycle[:2])
    assert lr_factor(0, config) == pytest.approx(0.5)


def test_validate_default_is_valid():
    assert FinetuneConfig().validate("attack") == []
    assert FinetuneConfig(schedule="warmup_cosine", steps=10, warmup_steps=10).validate("attack") == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"learning_rate": 0.0}, "attack.learning_rate"),
        ({"learning_rate": -1e-3}, "attack.learning_rate"),
        ({"steps": 0}, "attack.steps"),
        ({"batch_size": 0}, "attack.batch_size"),
        ({"schedule": "linear_warmup", "warmup_steps": 0}, "attack.warmup_steps"),
        ({"schedule": "warmup_cosine", "steps": 10, "warmup_steps": 11}, "attack.warmup_steps"),
        ({"schedule": "sgdr", "steps": 10, "warmup_steps": 2, "restart_steps": 0}, "attack.restart_steps"),
        ({"optimizer": "schedule_free_adamw", "schedule": "warmup_cosine", "warmup_steps": 2}, "attack.schedule"),
        ({"steps": 10, "warmup_steps": 11}, "attack.warmup_steps"),
    ],
)
def test_validate_bad_value(changes, field):
    problems = FinetuneConfig(**changes).validate("attack")

    assert len(problems) == 1
    assert field in problems[0]


def test_validate_reports_every_problem():
    problems = FinetuneConfig(learning_rate=0.0, steps=0, batch_size=0).validate("attack")

    assert len(problems) == 3


@pytest.mark.parametrize(
    ("name", "expected_type", "expected_options"),
    [
        ("adamw", torch.optim.AdamW, {"weight_decay": 0.05}),
        ("adam", torch.optim.Adam, {"weight_decay": 0.05}),
        ("sgd_momentum", torch.optim.SGD, {"momentum": 0.9, "nesterov": False, "weight_decay": 0.05}),
        ("sgd_nesterov", torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
        ("adagrad", torch.optim.Adagrad, {"weight_decay": 0.05}),
        ("adadelta", torch.optim.Adadelta, {"weight_decay": 0.05}),
    ],
)
def test_make_optimizer_builds_named_type(name, expected_type, expected_options):
    params = [torch.nn.Parameter(torch.zeros(3))]

    optimizer = make_optimizer(params, FinetuneConfig(optimizer=name, learning_rate=0.25, weight_decay=0.05))

    assert type(optimizer) is expected_type
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.25
    for option, value in expected_options.items():
        assert group[option] == value, f"{name}: {option} is {group[option]}, expected {value}"


def test_make_optimizer_schedule_free_takes_warmup():
    import schedulefree

    config = FinetuneConfig(optimizer="schedule_free_adamw", learning_rate=0.25, warmup_steps=7)

    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))], config)

    assert isinstance(optimizer, schedulefree.AdamWScheduleFree)
    assert optimizer.param_groups[0]["warmup_steps"] == 7


def test_finetune_schedule_free_ends_on_averaged_weights():
    import schedulefree

    batch = {"input_ids": torch.tensor([[0, 1, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 1, 1]])}
    config = FinetuneConfig(optimizer="schedule_free_adamw", learning_rate=0.1, steps=5)
    model = BiasLM(4)
    seen_in_callback = []

    finetune(model, lambda step: batch, config, callback=lambda step: seen_in_callback.append(model.bias.detach().clone()), callback_steps={5}, progress=False)

    # Replaying the same updates by hand: eval() switches to the averaged weights x.
    reference = BiasLM(4)
    optimizer = schedulefree.AdamWScheduleFree(reference.parameters(), lr=0.1, warmup_steps=0)
    optimizer.train()
    for _ in range(5):
        logits = reference(batch["input_ids"]).logits
        loss = next_token_loss(logits, batch["input_ids"], batch["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.eval()
    assert torch.allclose(model.bias.detach(), reference.bias.detach())
    assert torch.allclose(seen_in_callback[0], reference.bias.detach())


def test_finetune_callback_steps():
    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    calls = []

    finetune(BiasLM(3), lambda step: batch, FinetuneConfig(steps=20), callback=lambda step: calls.append(step + 1), callback_steps={1, 8, 16, 32}, progress=False)

    assert calls == [1, 8, 16]


def test_make_optimizer_unknown_raises():
    with pytest.raises(ValueError, match="'lion'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], FinetuneConfig(optimizer="lion"))


class BiasLM(torch.nn.Module):
    """A language model whose logits are one learned vector at every position."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = self.bias.expand(*input_ids.shape, -1)
        return type("Output", (), {"logits": logits})()


def test_finetune_applies_schedule():
    batch = {"input_ids": torch.tensor([[0, 1, 2, 1], [0, 3, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    config = FinetuneConfig(optimizer="sgd_momentum", learning_rate=0.5, steps=4, schedule="linear_warmup", warmup_steps=2)
    model = BiasLM(4)

    losses = finetune(model, lambda step: batch, config, progress=False)

    # Heavy-ball SGD by hand, at learning rates 0.25, 0.5, 0.5, 0.5. The gradient of the mean
    # cross-entropy with respect to the shared bias is softmax(bias) minus the target frequency.
    targets = torch.tensor([1, 2, 1, 3, 3], dtype=torch.float64)
    frequency = torch.stack([(targets == token).double().mean() for token in range(4)])
    bias = torch.zeros(4, dtype=torch.float64)
    velocity = torch.zeros(4, dtype=torch.float64)
    expected_losses = []
    for lr in (0.25, 0.5, 0.5, 0.5):
        log_probs = torch.log_softmax(bias, dim=0)
        expected_losses.append(-(frequency * log_probs).sum().item())
        velocity = 0.9 * velocity + (log_probs.exp() - frequency)
        bias = bias - lr * velocity

    assert losses == pytest.approx(expected_losses, rel=1e-6)
    assert torch.allclose(model.bias.detach(), bias, rtol=1e-6, atol=1e-7)


def test_finetune_grad_clip():
    batch = {"input_ids": torch.tensor([[0, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    config = FinetuneConfig(optimizer="sgd_momentum", learning_rate=1.0, steps=1, grad_clip=0.1)
    model = BiasLM(4)

    finetune(model, lambda step: batch, config, progress=False)

    # The first SGD step moves the bias by lr times the gradient, clipped to norm 0.1
    # (clip_grad_norm_ divides by the norm plus 1e-6, so it lands just below 0.1).
    assert model.bias.detach().norm().item() == pytest.approx(0.1, rel=1e-5)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_word_tokenizer(SENTENCES, tmp_path_factory.mktemp("tokenizer"))


def test_finetune_lowers_loss(tokenizer):
    model = build_llama(LlamaSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tokenizer)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    config = FinetuneConfig(optimizer="adamw", learning_rate=1e-2, steps=30)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        before = next_token_loss(logits, batch["input_ids"], batch["attention_mask"]).item()

    # Called under no_grad on purpose: finetune enables gradients itself.
    with torch.no_grad():
        losses = finetune(model, lambda step: batch, config, progress=False)

    assert len(losses) == 30
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_finetune_callback_stops_training():
    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    calls = []

    def callback(step):
        calls.append(step)
        return step >= 9

    losses = finetune(BiasLM(3), lambda step: batch, FinetuneConfig(steps=50), callback=callback, callback_every=5, progress=False)

    assert calls == [4, 9]
    assert len(losses) == 10


def test_finetune_passes_step_to_next_batch():
    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    requested = []

    def next_batch(step):
        requested.append(step)
        return batch

    finetune(BiasLM(3), next_batch, FinetuneConfig(steps=4), progress=False)

    assert requested == [0, 1, 2, 3]
