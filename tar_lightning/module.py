"""Tamper-resistance training (TAR) as a LightningModule with manual optimization.

One training step is one outer step of "Tamper-Resistant Safeguards for Open-Weight LLMs".
It samples an adversary and attacks a functional copy of the weights for K inner steps while
taking the tamper-resistance gradient. It then takes the retain loss on the weights
themselves and updates them with schedule-free AdamW. ``trainer.global_step`` counts outer
steps.

The tamper-resistance gradient is first order by default; ``meta_gradient: exact``
differentiates through the last ``meta_truncation`` inner steps (``tar_lightning.meta_gradient``).

Not supported yet: sharded strategies (FSDP, DeepSpeed), because the inner loop copies the
full parameter dict; exact meta-gradients through LoRA adversaries (they stay first order).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import asdict
from typing import Literal

import lightning as L
import numpy as np
import schedulefree
import torch

from tar_lightning.errors import ConfigError
from tar_lightning.data.preferences import preference_log_probs
from tar_lightning.adversaries import (
    AdversaryConfig,
    SampledAdversary,
    default_adversaries,
    default_refusal_adversaries,
    sample_adversary,
)
from tar_lightning.evaluation.mcq import multiple_choice_accuracy
from tar_lightning.inner_loop import (
    InnerLoopResult,
    InnerOptimizer,
    copy_params,
    functional_forward,
    run_inner_loop,
    tr_step_weights,
)
from tar_lightning.losses import (
    dpo_loss,
    gradient_surrogate,
    negative_cross_entropy_loss,
    negative_entropy_loss,
    next_token_loss,
    representation_distance,
    sequence_log_probs,
)
from tar_lightning.meta_gradient import run_inner_loop_exact
from tar_lightning.models import load_causal_lm

log = logging.getLogger("tar_lightning")


def _entropy_tr_loss(model, params, batch) -> torch.Tensor:
    return negative_entropy_loss(functional_forward(model, params, batch).logits, batch["attention_mask"])


def _negative_cross_entropy_tr_loss(model, params, batch) -> torch.Tensor:
    logits = functional_forward(model, params, batch).logits
    return negative_cross_entropy_loss(logits, batch["input_ids"], batch["attention_mask"])


def _dpo_tr_loss(model, params, batch, beta: float) -> torch.Tensor:
    """Return the DPO loss of a ``PreferencePool`` batch to which reference log-probabilities were added."""
    logits = functional_forward(model, params, batch).logits
    chosen, rejected = sequence_log_probs(logits, batch["input_ids"], batch["loss_mask"]).chunk(2)
    return dpo_loss(chosen, rejected, batch["reference_chosen"], batch["reference_rejected"], beta)


def _total_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))


class TARModule(L.LightningModule):
    """Tamper-resistance training of a causal LM that already carries an initial safeguard.

    Args:
        model_path: Directory or hub name of the safeguarded model that training starts from.
        base_model_path: Directory or hub name of the original model before the safeguard;
            frozen, it anchors the representation term of the retain loss.
        adversaries: The training adversary distribution. ``null`` (the default) is the
            authors' mix for the objective that ``tr_loss`` implies. For ``entropy``: forget
            corpus A, forget corpus B and retain-then-forget in equal parts. For ``dpo``: SFT
            on the ``harmful`` corpus, and benign-then-harmful in equal parts. Learning rates
            come from ``AdversaryConfig``.
        inner_steps: K, simulated attack steps per outer step.
        tr_every: Take the tamper-resistance loss after every ``tr_every``-th inner step.
        attacks_per_step: Independent attacks simulated per outer step, each with its own
            sampled adversary and its own share of the x_TR batch (which is split into this
            many parts, so ``data.tr_batch_size`` must be at least this); their
            tamper-resistance gradients are averaged. Several attacks per step lower the
            variance of the TR gradient, like data-parallel ranks that each sample one attack.
            The cost of an outer step grows linearly with it.
        step_weighting: ``uniform`` averages the tamper-resistance losses over the steps where
            they are taken; ``exponential`` weighs step k by exp(0.0625 (k - (K - 1))).
        tr_loss: Tamper-resistance loss. ``entropy``: negative entropy of held-out forget text
            (knowledge restriction). ``negative_cross_entropy``: minus the next-token loss of
            that text, the variant the authors rejected. ``dpo``: sigmoid DPO on held-out preference pairs
            (harmful request refusal), which needs ``data.preferences``; the reference
            log-probabilities are those of the model at the start of training, computed
            once and stored in every checkpoint.
        dpo_beta: beta of the DPO loss.
        tr_weight: lambda_TR, weight of the tamper-resistance gradient.
        retain_weight: lambda_retain, weight of the retain loss.
        representation_weight: Weight of the representation term inside the retain loss.
        tr_loss_floor: Skip a tamper-resistance gradient whose loss is already at -ln(vocab),
            the maximal entropy. Only with ``tr_loss: entropy``.
        learning_rate: Outer learning rate (schedule-free AdamW).
        warmup_steps: Outer warmup steps of schedule-free AdamW.
        weight_decay: Outer weight decay.
        grad_clip: Clip the combined outer gradient to this global norm; ``None`` disables it.
        inner_eps: Epsilon of the inner Adam-type optimizers.
        eval_every_n_steps: Score the datamodule's evaluation questions every this many outer
            steps (0 disables).
        seed: Seed of adversary sampling.
        attn_implementation: Attention kernel passed to ``from_pretrained``. ``meta_gradient:
            exact`` needs ``eager``, because fused ``sdpa`` kernels have no double backward.
        meta_gradient: ``first_order`` takes the TR gradient at the attacked weights;
            ``exact`` differentiates through the last ``meta_truncation`` inner steps.
        meta_truncation: T, the inner steps differentiated through with ``exact``
            (``null``: all K). Memory grows linearly in T.
        meta_grad_clip: Rescale the exact meta-gradient to at most this global norm before
            ``tr_weight`` applies; ``null`` disables it.

    Raises:
        ValueError: If any argument is out of range; the message lists every problem.
    """

    def __init__(
        self,
        model_path: str,
        base_model_path: str,
        adversaries: list[AdversaryConfig] | None = None,
        inner_steps: int = 16,
        tr_every: int = 4,
        attacks_per_step: int = 1,
        step_weighting: Literal["uniform", "exponential"] = "uniform",
        tr_loss: Literal["entropy", "negative_cross_entropy", "dpo"] = "entropy",
        dpo_beta: float = 0.1,
        tr_weight: float = 4.0,
        retain_weight: float = 1.0,
        representation_weight: float = 1.0,
        tr_loss_floor: bool = False,
        learning_rate: float = 3e-4,
        warmup_steps: int = 32,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        inner_eps: float = 1e-8,
        eval_every_n_steps: int = 0,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        meta_gradient: Literal["first_order", "exact"] = "first_order",
        meta_truncation: int | None = None,
        meta_grad_clip: float | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if adversaries:
            self.adversaries = [copy.deepcopy(a) for a in adversaries]
        else:
            self.adversaries = default_refusal_adversaries() if tr_loss == "dpo" else default_adversaries()
        # Plain dicts, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["adversaries"])
        self.hparams["adversaries"] = [asdict(a) for a in self.adversaries]
        problems = self.validate_arguments()
        if problems:
            raise ConfigError.from_problems("invalid model config", problems)
        # Weights of the TR losses, keyed by horizon K; adversaries with horizons add theirs.
        self.tr_weights = {inner_steps: tr_step_weights(inner_steps, tr_every, step_weighting)}
        self.rng = np.random.default_rng(seed)
        self.batch_generator = torch.Generator().manual_seed(seed)
        self.model = None
        self._frozen: list[torch.nn.Module] = []
        # Buffers of the inner loop, allocated on the first outer step and reused after it.
        self._inner_params: dict[str, torch.Tensor] | None = None
        self._tr_grads: list[torch.Tensor] | None = None
        # Sum of the TR gradients of several attacks per step; unused with one attack.
        self._tr_grads_sum: list[torch.Tensor] | None = None
        self._inner_optimizers: dict[str, InnerOptimizer] = {}
        # DPO reference log-probabilities of every x_TR pair, (pairs, 2): computed from the
        # starting weights before the first outer step, or restored from a checkpoint.
        self.dpo_reference: torch.Tensor | None = None

    def validate_arguments(
        self, sources: set[str] | None = None, has_preferences: bool | None = None, tr_batch_size: int | None = None
    ) -> list[str]:
        """Return every problem of the arguments, each naming its dotted key.

        ``sources`` (the adversary corpora), ``has_preferences`` (whether x_TR is preference
        pairs) and ``tr_batch_size`` (sequences per x_TR batch) describe the data; a check
        whose argument is ``None`` is skipped.
        """
        hp = self.hparams
        problems = []
        if hp.inner_steps < 1:
            problems.append(f"model.inner_steps must be at least 1, got {hp.inner_steps}")
        if not 1 <= hp.tr_every <= max(hp.inner_steps, 1):
            problems.append(f"model.tr_every must be in [1, inner_steps={hp.inner_steps}], got {hp.tr_every}")
        if hp.attacks_per_step < 1:
            problems.append(f"model.attacks_per_step must be at least 1, got {hp.attacks_per_step}")
        elif tr_batch_size is not None and tr_batch_size < hp.attacks_per_step:
            problems.append(
                f"data.tr_batch_size ({tr_batch_size}) must be at least model.attacks_per_step ({hp.attacks_per_step}), "
                "since every attack takes its own part of the x_TR batch"
            )
        for key in ("tr_weight", "retain_weight", "representation_weight", "weight_decay"):
            if hp[key] < 0:
                problems.append(f"model.{key} must not be negative, got {hp[key]}")
        if not hp.learning_rate > 0:
            problems.append(f"model.learning_rate must be positive, got {hp.learning_rate}")
        if hp.tr_loss not in ("entropy", "negative_cross_entropy", "dpo"):
            problems.append(f"model.tr_loss must be 'entropy', 'negative_cross_entropy' or 'dpo', got {hp.tr_loss!r}")
        if not hp.dpo_beta > 0:
            problems.append(f"model.dpo_beta must be positive, got {hp.dpo_beta}")
        if hp.tr_loss != "entropy" and hp.tr_loss_floor:
            problems.append(f"model.tr_loss_floor applies to the entropy loss only; set it to false with tr_loss {hp.tr_loss}")
        if hp.grad_clip is not None and not hp.grad_clip > 0:
            problems.append(f"model.grad_clip must be positive or null, got {hp.grad_clip}")
        if hp.meta_gradient == "exact":
            if hp.attn_implementation != "eager":
                problems.append(
                    f"model.attn_implementation must be eager with meta_gradient exact, because the fused "
                    f"{hp.attn_implementation!r} kernels have no double backward; got {hp.attn_implementation!r}"
                )
            if hp.meta_truncation is not None and not 1 <= hp.meta_truncation <= hp.inner_steps:
                problems.append(f"model.meta_truncation must be in [1, inner_steps={hp.inner_steps}] or null, got {hp.meta_truncation}")
            if hp.tr_loss_floor:
                problems.append("model.tr_loss_floor is only supported with meta_gradient first_order")
        if hp.meta_grad_clip is not None and not hp.meta_grad_clip > 0:
            problems.append(f"model.meta_grad_clip must be positive or null, got {hp.meta_grad_clip}")
        for i, adversary in enumerate(self.adversaries):
            problems += adversary.validate(f"model.adversaries[{i}]", sources)
            shortest = min(adversary.horizons or [hp.inner_steps])
            if adversary.horizons and shortest < hp.tr_every:
                problems.append(f"model.adversaries[{i}].horizons must each be at least model.tr_every={hp.tr_every}, got {adversary.horizons}")
            if hp.meta_gradient == "exact" and hp.meta_truncation is not None and adversary.horizons and shortest < hp.meta_truncation:
                problems.append(
                    f"model.adversaries[{i}].horizons must each be at least model.meta_truncation={hp.meta_truncation}, got {adversary.horizons}"
                )
        if hp.tr_loss == "dpo" and has_preferences is False:
            problems.append("model.tr_loss dpo needs preference pairs: set data.preferences instead of data.tamper_resistance")
        if hp.tr_loss != "dpo" and has_preferences:
            problems.append(f"data.preferences needs model.tr_loss dpo; the {hp.tr_loss} loss takes data.tamper_resistance text")
        return problems

    @property
    def base_model(self) -> torch.nn.Module:
        return self._frozen[0]

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = load_causal_lm(self.hparams.model_path, self.hparams.attn_implementation)
        base = load_causal_lm(self.hparams.base_model_path, self.hparams.attn_implementation)
        # A plain list keeps the frozen base model out of state_dict() and checkpoints.
        self._frozen = [base.eval().requires_grad_(False)]

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        pools = getattr(datamodule, "adversary_pools", None)
        if pools is None:
            raise RuntimeError("TARModule needs a datamodule with adversary_pools, such as TARDataModule")
        problems = self.validate_arguments(
            set(pools), getattr(datamodule, "preference_source", None) is not None, getattr(datamodule, "tr_batch_size", None)
        )
        if problems:
            raise ConfigError.from_problems("invalid model config", problems)

    def configure_optimizers(self):
        return schedulefree.AdamWScheduleFree(
            self.model.parameters(),
            lr=self.hparams.learning_rate,
            warmup_steps=self.hparams.warmup_steps,
            weight_decay=self.hparams.weight_decay,
        )

    # Schedule-free AdamW keeps two weight sequences. Training must see the one in train
    # mode; evaluation, export and checkpoints must see the averaged one in eval mode.
    def _schedule_free(self):
        return self.optimizers().optimizer

    def on_fit_start(self) -> None:
        self.base_model.to(self.device)
        if self.hparams.tr_loss == "dpo":
            self._prepare_dpo_reference()

    def _prepare_dpo_reference(self) -> None:
        """Compute the DPO reference log-probabilities once, from the weights training starts from.

        A resumed run restores them from its checkpoint in ``on_load_checkpoint``, which runs
        before this hook; recomputing them from the resumed weights would change the loss.
        """
        pool = self.trainer.datamodule.tr_pool
        if self.dpo_reference is None:
            if self.trainer.ckpt_path is not None:
                raise RuntimeError(
                    f"checkpoint {self.trainer.ckpt_path} has no DPO reference log-probabilities; "
                    "it was not written by a tr_loss dpo run, so start a fresh run instead of resuming"
                )
            self.dpo_reference = preference_log_probs(self.model, pool)
            log.info("tar: cached DPO reference log-probabilities of %d pairs", len(pool))
        if self.dpo_reference.shape[0] != len(pool):
            raise RuntimeError(
                f"the DPO reference has {self.dpo_reference.shape[0]} pairs but data.preferences has {len(pool)}; "
                "resume with the preference data that the run started with"
            )

    def on_train_start(self) -> None:
        self._schedule_free().train()

    def on_train_end(self) -> None:
        self._schedule_free().eval()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        adversary, inner = self._simulated_attacks(self._with_reference(batch["tr"]))
        retain = self._retain_loss(batch["retain"])
        norms = self._outer_step(retain["loss"], inner.tr_grads)
        metrics = {
            "train/retain_loss": retain["loss"].detach(),
            "train/lm_loss": retain["lm"],
            "train/representation_loss": retain["representation"],
            "train/tr_loss": float(np.mean(inner.tr_losses)),
            "train/tr_loss_last": inner.tr_losses[-1],
            "train/tr_gradients_used": float(inner.tr_used),
            "inner/adversary_loss_first": inner.adversary_losses[0],
            "inner/adversary_loss_last": inner.adversary_losses[-1],
            "inner/adversary_lr": adversary.learning_rate,
            "inner/adversary_index": float(adversary.index),
            "inner/switch_step": float(adversary.switch_step),
            "inner/steps": float(adversary.steps),
            **norms,
        }
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self.log_dict(
            {"tr": metrics["train/tr_loss"], "retain": metrics["train/retain_loss"]}, prog_bar=True, logger=False
        )

    def _with_reference(self, tr_batch: dict) -> dict:
        """Add the cached DPO reference log-probabilities of the batch's pairs (DPO loss only)."""
        if self.hparams.tr_loss != "dpo":
            return tr_batch
        reference = self.dpo_reference[tr_batch["index"].cpu()].to(self.device)
        return {**tr_batch, "reference_chosen": reference[:, 0], "reference_rejected": reference[:, 1]}

    def _tr_loss_fn(self):
        if self.hparams.tr_loss == "dpo":
            return functools.partial(_dpo_tr_loss, beta=self.hparams.dpo_beta)
        if self.hparams.tr_loss == "negative_cross_entropy":
            return _negative_cross_entropy_tr_loss
        return _entropy_tr_loss

    def _simulated_attacks(self, tr_batch: dict) -> tuple[SampledAdversary, InnerLoopResult]:
        """Run ``attacks_per_step`` attacks, each on its part of ``tr_batch``; average their TR gradients.

        Returns the last attack's adversary, for logging, and one result whose loss lists
        concatenate those of every attack.
        """
        count = self.hparams.attacks_per_step
        if count == 1:
            adversary = sample_adversary(self.adversaries, self.hparams.inner_steps, self.rng)
            return adversary, self._tamper_resistance_gradient(adversary, tr_batch)
        parts = [dict(zip(tr_batch, chunk)) for chunk in zip(*(t.tensor_split(count) for t in tr_batch.values()))]
        adversary_losses, tr_losses, tr_used = [], [], 0
        for index, part in enumerate(parts):
            adversary = sample_adversary(self.adversaries, self.hparams.inner_steps, self.rng)
            result = self._tamper_resistance_gradient(adversary, part)
            # Each attack refills the step's gradient buffer, so the sum lives in a second one.
            if self._tr_grads_sum is None:
                self._tr_grads_sum = [torch.empty_like(g) for g in result.tr_grads]
            if index == 0:
                torch._foreach_copy_(self._tr_grads_sum, result.tr_grads)
            else:
                torch._foreach_add_(self._tr_grads_sum, result.tr_grads)
            adversary_losses += result.adversary_losses
            tr_losses += result.tr_losses
            tr_used += result.tr_used
        torch._foreach_div_(self._tr_grads_sum, count)
        torch._foreach_copy_(self._tr_grads, self._tr_grads_sum)
        return adversary, InnerLoopResult(self._tr_grads, adversary_losses, tr_losses, tr_used)

    def _tamper_resistance_gradient(self, adversary: SampledAdversary, tr_batch: dict) -> InnerLoopResult:
        """Attack a functional copy of the weights for K steps; return the weighted TR gradient."""
        pools = self.trainer.datamodule.adversary_pools
        steps = range(adversary.steps)
        batches = []
        for k in steps:
            sample = pools[adversary.source_at(k)].sample(adversary.config.batch_size, self.batch_generator)
            batches.append({name: tensor.to(self.device) for name, tensor in sample.items()})
        floor = -math.log(self.model.config.vocab_size) if self.hparams.tr_loss_floor else None
        low_rank = adversary.config.low_rank()
        # LoRA attackers keep their own optimizer state, shaped like their factors.
        key = adversary.config.optimizer if low_rank is None else f"{adversary.config.optimizer}/lora"
        if key not in self._inner_optimizers:
            self._inner_optimizers[key] = InnerOptimizer(adversary.config.optimizer, eps=self.hparams.inner_eps)
        learning_rates = [adversary.learning_rate_at(k) for k in steps]
        attack = (self.model, self._copy_weights(), batches, learning_rates, self._inner_optimizers[key])
        tamper_resistance = (tr_batch, self._tr_loss_fn(), self._tr_weights_for(adversary.steps))
        if low_rank is not None:
            return run_inner_loop(*attack, *tamper_resistance, floor, self._tr_grads, low_rank, self.batch_generator)
        if self.hparams.meta_gradient == "exact":
            result = run_inner_loop_exact(*attack, *tamper_resistance, self.hparams.meta_truncation, self.hparams.meta_grad_clip)
            # _outer_step scales and reuses the gradient in place, so it moves into the step's buffer.
            torch._foreach_copy_(self._tr_grads, result.tr_grads)
            result.tr_grads = self._tr_grads
            return result
        return run_inner_loop(*attack, *tamper_resistance, floor, self._tr_grads)

    def _tr_weights_for(self, steps: int) -> dict[int, float]:
        if steps not in self.tr_weights:
            self.tr_weights[steps] = tr_step_weights(steps, self.hparams.tr_every, self.hparams.step_weighting)
        return self.tr_weights[steps]

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        """Functional copies of the current weights, written into the buffers of the last step."""
        if self._inner_params is None:
            self._inner_params = copy_params(self.model)
            self._tr_grads = [torch.zeros_like(t) for t in self._inner_params.values()]
        else:
            with torch.no_grad():
                torch._foreach_copy_(list(self._inner_params.values()), list(self.model.parameters()))
        return self._inner_params

    def _retain_loss(self, batch: dict) -> dict:
        """Next-token loss plus the representation distance to the frozen base model."""
        outputs = self.model(**batch, output_hidden_states=True, use_cache=False)
        with torch.no_grad():
            base_hidden = self.base_model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        lm = next_token_loss(outputs.logits, batch["input_ids"], batch["attention_mask"])
        representation = representation_distance(outputs.hidden_states, base_hidden, batch["attention_mask"])
        loss = lm + self.hparams.representation_weight * representation
        return {"loss": loss, "lm": lm.detach(), "representation": representation.detach()}

    def _outer_step(self, retain_loss: torch.Tensor, tr_grads: list[torch.Tensor]) -> dict[str, float]:
        """Update the weights with lambda_retain * grad(L_retain) + lambda_TR * g_TR.

        The TR gradient enters through ``gradient_surrogate``, whose gradient is exactly
        lambda_TR * g_TR, so ``manual_backward`` carries both parts and a data-parallel
        strategy averages them across processes.
        """
        optimizer = self.optimizers()
        params = list(self.model.parameters())
        torch._foreach_mul_(tr_grads, self.hparams.tr_weight)
        surrogate = gradient_surrogate(params, tr_grads)
        tr_norm = _total_norm(tr_grads)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(self.hparams.retain_weight * retain_loss + surrogate)
        grads = [p.grad for p in params]
        total_norm = _total_norm(grads)
        # The buffer is refilled next step, so it can hold g_TR - total = -grad(retain part).
        torch._foreach_sub_(tr_grads, grads)
        norms = {"grad/tr_norm": tr_norm, "grad/retain_norm": _total_norm(tr_grads), "grad/total_norm": total_norm}
        if self.hparams.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        return norms

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.hparams.eval_every_n_steps
        if every > 0 and self.global_step % every == 0:
            # Straight to the loggers: a value passed to self.log in this hook would be
            # repeated at every later step until the next evaluation.
            metrics = self.evaluate_questions()
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def evaluate_questions(self) -> dict[str, float]:
        """Accuracy on the datamodule's evaluation questions, with the eval-mode weights."""
        datamodule = self.trainer.datamodule
        optimizer = self._schedule_free()
        optimizer.eval()
        try:
            return {
                f"eval/{name}_acc": multiple_choice_accuracy(self.model, datamodule.tokenizer, rows).value
                for name, rows in datamodule.eval_questions.items()
            }
        finally:
            optimizer.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store eval-mode weights and the sampling state, so a checkpoint both evaluates and resumes."""
        optimizer = self._schedule_free()
        if optimizer.param_groups[0]["train_mode"]:
            optimizer.eval()
            checkpoint["state_dict"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            checkpoint["optimizer_states"] = [copy.deepcopy(optimizer.state_dict())]
            optimizer.train()
        checkpoint["tar_sampling"] = {"rng": self.rng.bit_generator.state, "batches": self.batch_generator.get_state()}
        if self.dpo_reference is not None:
            checkpoint["tar_dpo_reference"] = self.dpo_reference.clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("tar_sampling")
        if state is not None:
            self.rng.bit_generator.state = state["rng"]
            self.batch_generator.set_state(state["batches"])
        if "tar_dpo_reference" in checkpoint:
            self.dpo_reference = checkpoint["tar_dpo_reference"]
