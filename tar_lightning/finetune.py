"""Plain supervised fine-tuning with ``torch.optim``: base pretraining and test-time attacks.

This is ordinary training on a real module (not functional weights), so evaluation attacks
run the same code an attacker with an off-the-shelf loop would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

import schedulefree
import torch
from tqdm.auto import tqdm

from tar_lightning.losses import next_token_loss

OptimizerName = Literal["adamw", "adam", "sgd_momentum", "sgd_nesterov", "adagrad", "adadelta", "schedule_free_adamw"]
ScheduleName = Literal["constant", "linear_warmup", "warmup_cosine", "sgdr"]


@dataclass
class FinetuneConfig:
    """Optimizer, schedule and length of a fine-tuning run.

    Args:
        optimizer: ``adamw``, ``adam``, ``sgd_momentum``, ``sgd_nesterov``, ``adagrad``,
            ``adadelta`` or ``schedule_free_adamw``. Schedule-free AdamW does its own warmup
            and averaging, so it takes ``warmup_steps`` itself and needs ``schedule: constant``;
            the model ends with its averaged weights.
        learning_rate: Peak learning rate.
        steps: Optimizer steps.
        batch_size: Sequences per step.
        schedule: ``constant``; ``linear_warmup`` (linear rise over ``warmup_steps``, then
            constant); ``warmup_cosine`` (linear rise, then cosine decay to 0 at ``steps``);
            ``sgdr`` (linear rise, then cosine cycles of ``restart_steps`` steps, each
            restarting at the peak: SGD with warm restarts).
        warmup_steps: Warmup length in steps.
        restart_steps: Cycle length of ``sgdr``.
        weight_decay: Decoupled weight decay for ``adamw``, L2 penalty for the others.
        grad_clip: Clip the global gradient norm to this value; ``None`` disables clipping.
    """

    optimizer: OptimizerName = "adamw"
    learning_rate: float = 1e-3
    steps: int = 100
    batch_size: int = 32
    schedule: ScheduleName = "constant"
    warmup_steps: int = 0
    restart_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def validate(self, key: str) -> list[str]:
        """Return every problem of this config, each naming its dotted key."""
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"{key}.learning_rate must be positive, got {self.learning_rate}")
        if self.steps < 1:
            problems.append(f"{key}.steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"{key}.batch_size must be at least 1, got {self.batch_size}")
        if self.schedule != "constant" and not 0 < self.warmup_steps <= self.steps:
            problems.append(f"{key}.warmup_steps must be in [1, steps] with schedule {self.schedule}, got {self.warmup_steps}")
        if self.schedule == "sgdr" and self.restart_steps < 1:
            problems.append(f"{key}.restart_steps must be at least 1 with schedule sgdr, got {self.restart_steps}")
        if self.optimizer == "schedule_free_adamw" and self.schedule != "constant":
            problems.append(
                f"{key}.schedule must be constant with optimizer schedule_free_adamw, which warms up by itself "
                f"over warmup_steps; got {self.schedule}"
            )
        if self.schedule == "constant" and not 0 <= self.warmup_steps <= self.steps:
            problems.append(f"{key}.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        return problems


def make_optimizer(params: Iterable[torch.nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """Build the ``torch.optim`` optimizer that ``config.optimizer`` names."""
    lr, wd = config.learning_rate, config.weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if config.optimizer in ("sgd_momentum", "sgd_nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=config.optimizer == "sgd_nesterov", weight_decay=wd)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
    if config.optimizer == "schedule_free_adamw":
        return schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=wd, warmup_steps=config.warmup_steps)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def lr_factor(step: int, config: FinetuneConfig) -> float:
    """Multiplier of the peak learning rate at 0-based step ``step``."""
    if config.schedule == "constant":
        return 1.0
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "linear_warmup":
        return 1.0
    if config.schedule == "sgdr":
        progress = ((step - config.warmup_steps) % config.restart_steps) / config.restart_steps
    else:
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_optimizer_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """Switch a schedule-free optimizer between its training and averaged weights; others are unaffected.

    Schedule-free optimizers keep two weight sequences: gradients must be taken at the
    training one, while evaluation and export must see the averaged one.
    """
    switch = getattr(optimizer, "train" if train else "eval", None)
    if callable(switch):
        switch()


def finetune(
    model: torch.nn.Module,
    next_batch: Callable[[int], dict[str, torch.Tensor]],
    config: FinetuneConfig,
    description: str = "fine-tune",
    callback: Callable[[int], bool] | None = None,
    callback_every: int = 0,
    progress: bool = True,
    callback_steps: Collection[int] = (),
) -> list[float]:
    """Train ``model`` on next-token loss for ``config.steps`` steps; return the loss of each step.

    ``next_batch(step)`` returns the batch of a 0-based step. ``callback(step)`` runs after
    every ``callback_every`` steps when that is positive, and after the steps whose 1-based
    count is in ``callback_steps``. It sees the weights an evaluation should see (the
    averaged ones of a schedule-free optimizer) and stops training by returning ``True``.
    Gradients are enabled explicitly, so this also works when called under
    ``torch.no_grad`` or during evaluation.
    """
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    device = next(model.parameters()).device
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=description, leave=False, disable=not progress, dynamic_ncols=True)
    set_optimizer_mode(optimizer, train=True)
    with torch.inference_mode(False), torch.enable_grad():
        for step in bar:
            batch = {k: v.to(device) for k, v in next_batch(step).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = next_token_loss(logits, batch["input_ids"], batch["attention_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            if callback is not None and ((callback_every > 0 and done % callback_every == 0) or done in callback_steps):
                set_optimizer_mode(optimizer, train=False)
                stop = callback(step)
                set_optimizer_mode(optimizer, train=True)
                model.train()
                if stop:
                    break
    set_optimizer_mode(optimizer, train=False)
    bar.close()
    return losses
