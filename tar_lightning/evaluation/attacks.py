"""Fine-tuning attacks on saved models, each from a fresh copy of the evaluated weights.

An attack is plain supervised fine-tuning, as an attacker with the released weights would
run it. Its options cover the axes on which tamper-resistance claims have been broken. They
are the optimizer, learning rate and schedule (``FinetuneConfig``) and the data: a corpus, a
retain-then-forget switch, or a share of benign sequences in every batch. They also choose
full-parameter or LoRA updates, and the training loop (ours, or the ``transformers`` ``Trainer``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from tar_lightning.data.sources import TokenPool
from tar_lightning.finetune import FinetuneConfig, finetune
from tar_lightning.models import load_causal_lm

# Every linear projection of a Llama block: attention and MLP.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Optimizer names of this project and the ``optim`` values of ``transformers.TrainingArguments``.
TRAINER_OPTIMIZERS = {"adamw": "adamw_torch", "sgd_momentum": "sgd", "adagrad": "adagrad"}
# Schedules of this project and the ``lr_scheduler_type`` of ``transformers.TrainingArguments``.
TRAINER_SCHEDULES = {"constant": "constant", "linear_warmup": "constant_with_warmup", "warmup_cosine": "cosine"}


@dataclass
class LoraAttackConfig:
    """Low-rank adapters trained by ``peft`` instead of the full weights.

    Args:
        rank: Rank r of each adapter.
        alpha: Scaling numerator; adapters are scaled by alpha / r.
        dropout: Dropout on the adapters' input.
        target_modules: Names of the linear layers that get adapters.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))

    def validate(self, key: str) -> list[str]:
        problems = []
        if self.rank < 1:
            problems.append(f"{key}.rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"{key}.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append(f"{key}.target_modules must name at least one layer")
        return problems


@dataclass
class AttackConfig(FinetuneConfig):
    """A supervised fine-tuning attack.

    Args:
        name: Label in the report.
        data: Corpus the attacker trains on (a key of the attack corpora).
        retain_data: Corpus of the first ``retain_fraction`` of the steps.
        retain_fraction: Share of steps, from the start, spent on ``retain_data``
            (retain-then-forget attacks); 0 trains on ``data`` throughout.
        benign_data: Corpus mixed into every batch when ``benign_share`` is positive.
        benign_share: Share of each batch's sequences drawn from ``benign_data`` (mixed
            benign and harmful data).
        lora: Train ``peft`` LoRA adapters instead of every weight; the adapters are merged
            into the weights before scoring. ``null`` trains every weight.
        loop: ``torch``: this project's loop; ``hf_trainer``: the ``transformers`` ``Trainer``
            (optimizers ``adamw``, ``sgd_momentum``, ``adagrad``; no ``sgdr`` schedule), as an
            attacker with an off-the-shelf script would run it.
        held_out: Whether tamper-resistance training never saw an attack of this kind.
    """

    name: str = "attack"
    data: str = "forget_a"
    retain_data: str = "retain"
    retain_fraction: float = 0.0
    benign_data: str = "retain"
    benign_share: float = 0.0
    lora: LoraAttackConfig | None = None
    loop: Literal["torch", "hf_trainer"] = "torch"
    held_out: bool = True

    def corpora(self) -> list[str]:
        """Names of the corpora this attack trains on."""
        used = [self.data]
        if self.retain_fraction > 0:
            used.append(self.retain_data)
        if self.benign_share > 0:
            used.append(self.benign_data)
        return used

    def validate(self, key: str, sources: set[str] | None = None) -> list[str]:
        problems = super().validate(key)
        if not 0.0 <= self.retain_fraction < 1.0:
            problems.append(f"{key}.retain_fraction must be in [0, 1), got {self.retain_fraction}")
        if not 0.0 <= self.benign_share < 1.0:
            problems.append(f"{key}.benign_share must be in [0, 1), got {self.benign_share}")
        if self.lora is not None:
            problems += self.lora.validate(f"{key}.lora")
        if self.loop == "hf_trainer":
            if self.optimizer not in TRAINER_OPTIMIZERS:
                problems.append(f"{key}.optimizer must be one of {sorted(TRAINER_OPTIMIZERS)} with loop hf_trainer, got {self.optimizer}")
            if self.schedule not in TRAINER_SCHEDULES:
                problems.append(f"{key}.schedule must be one of {sorted(TRAINER_SCHEDULES)} with loop hf_trainer, got {self.schedule}")
            if self.benign_share > 0 or self.retain_fraction > 0:
                problems.append(f"{key}: loop hf_trainer trains on one corpus; set retain_fraction and benign_share to 0")
        if sources is not None:
            for source in self.corpora():
                if source not in sources:
                    problems.append(f"{key} uses data {source!r}, which is not one of {sorted(sources)}")
        return problems


@dataclass
class AttackRun:
    """The attacked model (LoRA adapters merged), the loss of every step, and the step count."""

    model: torch.nn.Module
    losses: list[float]
    steps: int


def concat_batches(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack two right-padded batches into one, padding the narrower with masked zeros."""
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    out = {}
    for key in ("input_ids", "attention_mask"):
        parts = [torch.nn.functional.pad(batch[key], (0, width - batch[key].shape[1])) for batch in (first, second)]
        out[key] = torch.cat(parts)
    return out


def attack_batches(attack: AttackConfig, pools: dict[str, TokenPool], generator: torch.Generator) -> Callable[[int], dict]:
    """Return ``next_batch(step)`` for ``attack``: its corpus at each step and its benign share."""
    switch = int(attack.retain_fraction * attack.steps)
    benign = round(attack.benign_share * attack.batch_size)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        source = attack.retain_data if step < switch else attack.data
        if benign == 0:
            return pools[source].sample(attack.batch_size, generator)
        harmful = pools[source].sample(attack.batch_size - benign, generator)
        return concat_batches(harmful, pools[attack.benign_data].sample(benign, generator))

    return next_batch


def _add_lora(model: torch.nn.Module, config: LoraAttackConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads a transformers property that is deprecated; nothing for a user to change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def _hf_trainer_finetune(
    model: torch.nn.Module,
    next_batch: Callable[[int], dict],
    attack: AttackConfig,
    seed: int,
    callback: Callable[[int], bool] | None,
    callback_steps: set[int],
) -> list[float]:
    """Fine-tune with ``transformers.Trainer`` on the same batches; return the loss of each step."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class Batches(torch.utils.data.IterableDataset):
        # Single rows in batch order; the Trainer regroups them into the same batches.
        def __iter__(self):
            for step in range(attack.steps):
                batch = next_batch(step)
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                for i in range(batch["input_ids"].shape[0]):
                    yield {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "labels": labels[i]}

    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if callback is not None and state.global_step in callback_steps:
                was_training = model.training
                if callback(state.global_step - 1):
                    control.should_training_stop = True
                model.train(was_training)

    with tempfile.TemporaryDirectory(prefix="tar-attack-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=attack.steps,
            per_device_train_batch_size=attack.batch_size,
            learning_rate=attack.learning_rate,
            lr_scheduler_type=TRAINER_SCHEDULES[attack.schedule],
            warmup_steps=attack.warmup_steps,
            optim=TRAINER_OPTIMIZERS[attack.optimizer],
            weight_decay=attack.weight_decay,
            max_grad_norm=attack.grad_clip if attack.grad_clip is not None else 0.0,
            seed=seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=Batches(), callbacks=[Record()])
        # With its progress bar disabled the Trainer prints every log line; the red-team has its own bar.
        trainer.remove_callback(PrinterCallback)
        with torch.inference_mode(False), torch.enable_grad():
            trainer.train()
    return losses


def run_attack(
    model_path: str,
    attack: AttackConfig,
    pools: dict[str, TokenPool],
    seed: int,
    device: torch.device,
    progress: bool = True,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
    callback_steps: set[int] | frozenset[int] = frozenset(),
    dtype: torch.dtype = torch.float32,
) -> AttackRun:
    """Load a fresh copy of ``model_path``, fine-tune it with ``attack`` and return the result.

    ``callback(step, model)`` runs after each step whose 1-based count is in
    ``callback_steps``, for example to trace a learning curve. The weights are loaded in
    ``dtype``. The saved model is only read, never written.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = load_causal_lm(model_path, dtype=dtype).to(device)
    if attack.lora is not None:
        model = _add_lora(model, attack.lora)
    next_batch = attack_batches(attack, pools, generator)

    def on_step(step: int) -> bool:
        if callback is not None:
            callback(step + 1, model)
        return False

    if attack.loop == "hf_trainer":
        losses = _hf_trainer_finetune(model, next_batch, attack, seed, on_step, set(callback_steps))
    else:
        description = f"attack {attack.name} seed {seed}"
        losses = finetune(model, next_batch, attack, description, callback=on_step, progress=progress, callback_steps=callback_steps)
    if attack.lora is not None:
        model = model.merge_and_unload()
    model.eval()
    return AttackRun(model, losses, len(losses))
