"""Simulated fine-tuning attacks on functional weight copies, and their tamper-resistance gradient.

Everything here is plain PyTorch over a parameter dict (``torch.func.functional_call``) and
knows nothing of Lightning or of distributed training, so it runs and tests on its own.

The gradient is the first-order approximation of the paper "Tamper-Resistant Safeguards for
Open-Weight LLMs": the gradient of the tamper-resistance loss with respect to the attacked
weights theta'_k stands in for its gradient with respect to the defended weights theta, and
nothing is differentiated through the attack steps.

A LoRA adversary (``LowRankAdversary``) trains low-rank factors B A added to some weight
matrices instead of the weights themselves. Since the attacked weight is W + (alpha / r) B A,
its derivative with respect to W is the identity, so the first-order TR gradient is again the
gradient at the attacked weights. Exact meta-gradients live in ``tar_lightning.meta_gradient``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.func import functional_call

from tar_lightning.losses import next_token_loss

Params = dict[str, torch.Tensor]
Batch = Mapping[str, torch.Tensor]
InnerOptimizerName = Literal["adamw", "adam", "sgd_momentum"]


def functional_forward(model: torch.nn.Module, params: Params, batch: Batch, output_hidden_states: bool = False):
    """Run ``model`` with the weights in ``params`` and its own buffers.

    ``strict=True`` makes a missing or unexpected parameter an error instead of a silent
    fall-back to the module's own weights. Tied weights (an output head sharing the input
    embedding) appear once in ``named_parameters()``, and ``tie_weights=True`` applies that one
    tensor to both.
    """
    return functional_call(
        model,
        {**dict(model.named_buffers()), **params},
        args=(),
        kwargs={
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "output_hidden_states": output_hidden_states,
            "use_cache": False,
        },
        strict=True,
        tie_weights=True,
    )


def lm_loss(model: torch.nn.Module, params: Params, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` at ``params`` on ``batch``."""
    logits = functional_forward(model, params, batch).logits
    return next_token_loss(logits, batch["input_ids"], batch["attention_mask"])


@dataclass
class LowRankAdversary:
    """Functional LoRA updates for the simulated attack.

    Args:
        rank: Rank r of each update.
        alpha: Scale numerator; an update adds (alpha / r) B A to its weight.
        targets: Suffixes of the parameter names that get an update, for example ``q_proj.weight``.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")

    def factors(self, params: Params, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fresh (A, B) per targeted 2-D weight: A uniform in +-1/sqrt(in features), B zero, as LoRA starts."""
        out = {}
        for name, weight in params.items():
            if weight.dim() != 2 or not name.endswith(self.targets):
                continue
            rows, columns = weight.shape
            bound = 1.0 / columns**0.5
            a = (torch.rand(self.rank, columns, generator=generator) * 2 - 1) * bound
            a = a.to(device=weight.device, dtype=weight.dtype).requires_grad_(True)
            b = torch.zeros(rows, self.rank, device=weight.device, dtype=weight.dtype, requires_grad=True)
            out[name] = (a, b)
        if not out:
            raise ValueError(f"no 2-D parameter name ends with one of {self.targets}; set the adversary's LoRA targets")
        return out

    def apply(self, params: Params, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Params:
        """Return the attacked weights: W + (alpha / r) B A where a factor pair exists, W elsewhere."""
        scale = self.alpha / self.rank
        return {name: (w + scale * factors[name][1] @ factors[name][0]) if name in factors else w for name, w in params.items()}


def copy_params(model: torch.nn.Module) -> Params:
    """Detached, trainable copies of ``model``'s parameters, one tensor per tied group."""
    return {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}


@dataclass
class InnerOptimizer:
    """A functional optimizer for the simulated attack, matching ``torch.optim`` step for step.

    Args:
        name: ``adamw`` (decoupled weight decay), ``adam`` (no weight decay) or
            ``sgd_momentum`` (heavy-ball momentum, no dampening).
        betas: Adam moment decay rates.
        eps: Adam denominator term.
        weight_decay: Decoupled weight decay of ``adamw``.
        momentum: Momentum of ``sgd_momentum``.
    """

    name: InnerOptimizerName = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.9
    _state: dict[str, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        allowed = ("adamw", "adam", "sgd_momentum")
        if self.name not in allowed:
            raise ValueError(f"unknown inner optimizer {self.name!r}; use one of {allowed}")

    def reset(self, params: Sequence[torch.Tensor]) -> None:
        """Start a fresh optimizer state for ``params``, as each simulated attack does.

        Buffers of a previous reset are zeroed in place when the shapes match, so an outer
        step does not allocate a new optimizer state.
        """
        self._steps = 0
        names = ("momentum",) if self.name == "sgd_momentum" else ("exp_avg", "exp_avg_sq", "denom")
        first = self._state.get(names[0], [])
        reusable = len(first) == len(params) and all(
            b.shape == p.shape and b.dtype == p.dtype and b.device == p.device for b, p in zip(first, params)
        )
        if reusable:
            for name in names:
                torch._foreach_zero_(self._state[name])
        else:
            self._state = {name: [torch.zeros_like(p) for p in params] for name in names}

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> None:
        """Update ``params`` in place with ``grads`` at learning rate ``lr``."""
        if not self._state:
            raise RuntimeError("InnerOptimizer.step called before reset(params)")
        self._steps += 1
        if self.name == "sgd_momentum":
            buffers = self._state["momentum"]
            torch._foreach_mul_(buffers, self.momentum)
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-lr)
            return
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = self._state["exp_avg"], self._state["exp_avg_sq"]
        if self.name == "adamw" and self.weight_decay:
            torch._foreach_mul_(params, 1.0 - lr * self.weight_decay)
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**self._steps
        bias_correction2 = 1.0 - beta2**self._steps
        denom = self._state["denom"]
        torch._foreach_copy_(denom, exp_avg_sq)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, bias_correction2**0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / bias_correction1)


def tr_step_weights(
    inner_steps: int, tr_every: int, weighting: Literal["uniform", "exponential"], rate: float = 0.0625
) -> dict[int, float]:
    """Weights of the tamper-resistance loss, keyed by the 0-based inner step after which it is taken.

    The loss is taken after every ``tr_every``-th step counted back from the last one,
    ``inner_steps - 1, inner_steps - 1 - tr_every, ...``, so the fully attacked weights are
    always scored. ``uniform`` averages
    them, so the weights sum to 1 as in "Tamper-Resistant Safeguards for Open-Weight LLMs".
    ``exponential`` weighs step k by ``exp(rate * (k - (inner_steps - 1)))``, so the last step
    weighs 1, as the run scripts released with that paper do.
    """
    if inner_steps < 1 or not 1 <= tr_every <= inner_steps:
        raise ValueError(f"need inner_steps >= 1 and 1 <= tr_every <= inner_steps, got {inner_steps} and {tr_every}")
    steps = sorted(range(inner_steps - 1, -1, -tr_every))
    if weighting == "uniform":
        return {k: 1.0 / len(steps) for k in steps}
    if weighting == "exponential":
        return {k: float(torch.tensor(rate * (k - (inner_steps - 1))).exp()) for k in steps}
    raise ValueError(f"unknown step weighting {weighting!r}; use 'uniform' or 'exponential'")


@dataclass
class InnerLoopResult:
    """Output of one simulated attack.

    Attributes:
        tr_grads: Weighted sum of tamper-resistance gradients, aligned with the parameter dict.
        adversary_losses: The attacker's training loss at each inner step.
        tr_losses: The tamper-resistance loss at each step where it was taken.
        tr_used: How many tamper-resistance gradients were added (fewer than taken when a
            loss was already at its floor).
    """

    tr_grads: list[torch.Tensor]
    adversary_losses: list[float]
    tr_losses: list[float]
    tr_used: int


def run_inner_loop(
    model: torch.nn.Module,
    params: Params,
    adversary_batches: Sequence[Batch],
    learning_rates: Sequence[float],
    optimizer: InnerOptimizer,
    tr_batch: Batch,
    tr_loss_fn: Callable[[torch.nn.Module, Params, Batch], torch.Tensor],
    tr_weights: Mapping[int, float],
    tr_floor: float | None = None,
    tr_grads: list[torch.Tensor] | None = None,
    low_rank: LowRankAdversary | None = None,
    generator: torch.Generator | None = None,
) -> InnerLoopResult:
    """Attack ``params`` in place for ``len(adversary_batches)`` steps and return the TR gradient.

    Step k trains on ``adversary_batches[k]`` at ``learning_rates[k]``. After each step k in
    ``tr_weights``, the tamper-resistance loss of the attacked weights on ``tr_batch`` is taken
    and ``tr_weights[k]`` times its gradient is added to the result. With ``tr_floor`` set, a
    gradient whose loss is already at or below the floor is skipped. ``tr_grads``, when given,
    is a buffer shaped like ``params`` that is zeroed and filled instead of a new allocation.

    With ``low_rank``, the attacker trains LoRA factors drawn from ``generator`` and ``params``
    stay as they are; the TR gradient is taken at the attacked weights W + (alpha / r) B A.
    """
    if len(learning_rates) != len(adversary_batches):
        raise ValueError(f"got {len(adversary_batches)} adversary batches but {len(learning_rates)} learning rates")
    names = list(params)
    if low_rank is None:
        trained = [params[n] for n in names]

        def attacked() -> Params:
            return params

    else:
        factors = low_rank.factors(params, generator if generator is not None else torch.Generator().manual_seed(0))
        trained = [t for pair in factors.values() for t in pair]

        def attacked() -> Params:
            return low_rank.apply(params, factors)

    optimizer.reset(trained)
    if tr_grads is None:
        tr_grads = [torch.zeros_like(params[n]) for n in names]
    else:
        torch._foreach_zero_(tr_grads)
    adversary_losses: list[float] = []
    tr_losses: list[float] = []
    used = 0
    for k, (batch, lr) in enumerate(zip(adversary_batches, learning_rates)):
        loss = lm_loss(model, attacked(), batch)
        grads = torch.autograd.grad(loss, trained)
        optimizer.step(trained, grads, lr)
        adversary_losses.append(loss.item())
        if k not in tr_weights:
            continue
        weights = attacked()
        tr_loss = tr_loss_fn(model, weights, tr_batch)
        tr_losses.append(tr_loss.item())
        if tr_floor is not None and tr_losses[-1] <= tr_floor:
            continue
        # For LoRA, d(W + s B A)/dW is the identity, so the gradient at the attacked weights is the TR gradient.
        grads = torch.autograd.grad(tr_loss, [weights[n] for n in names])
        torch._foreach_add_(tr_grads, grads, alpha=tr_weights[k])
        used += 1
    return InnerLoopResult(tr_grads, adversary_losses, tr_losses, used)

