"""Exact tamper-resistance meta-gradients, differentiated through the last T inner steps.

"Tamper-Resistant Safeguards for Open-Weight LLMs" defines the tamper-resistance objective
as a loss of the attacked weights theta_K(theta), a function of the defended weights theta
through K optimizer steps. ``run_inner_loop`` approximates its gradient to first order. This
module differentiates through the steps themselves:

- the first K - T steps run as in the first-order loop, without a graph, so theta_{K-T} is
  treated as theta plus a constant (truncated backpropagation);
- the last T steps are written as differentiable functions of theta_{K-T}
  (``create_graph=True``), and the weighted tamper-resistance losses taken after them are
  backpropagated to theta_{K-T}.

Memory grows linearly in T: every differentiated step keeps its forward graph and the graph
of its gradient, about three times the activations and two parameter-sized tensors per step.
Through an Adam-type step the Jacobian carries lr / (sqrt(v) + eps), which can be large where
v is tiny, so a larger ``eps``, SGD-type inner steps or ``clip`` keep the result finite.

Double backward needs a differentiable attention kernel: PyTorch's fused CPU attention has no
derivative of its backward pass, so models for this mode load with ``attn_implementation="eager"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from tar_lightning.inner_loop import Batch, InnerLoopResult, InnerOptimizer, Params, lm_loss

LossFn = Callable[[torch.nn.Module, Params, Batch], torch.Tensor]


def _differentiable_step(
    optimizer: InnerOptimizer,
    params: list[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: dict[str, list[torch.Tensor]],
    step: int,
    lr: float,
) -> list[torch.Tensor]:
    """Return the weights after one step of ``optimizer``, as differentiable functions of ``params``.

    ``state`` contains the moment tensors and is replaced by their new values; ``step`` is the
    1-based count of the step, for Adam's bias correction.
    """
    if optimizer.name == "sgd_momentum":
        state["momentum"] = [optimizer.momentum * m + g for m, g in zip(state["momentum"], grads)]
        return [p - lr * m for p, m in zip(params, state["momentum"])]
    beta1, beta2 = optimizer.betas
    state["exp_avg"] = [beta1 * m + (1.0 - beta1) * g for m, g in zip(state["exp_avg"], grads)]
    state["exp_avg_sq"] = [beta2 * v + (1.0 - beta2) * g * g for v, g in zip(state["exp_avg_sq"], grads)]
    correction1 = 1.0 - beta1**step
    correction2 = 1.0 - beta2**step
    decay = 1.0 - lr * optimizer.weight_decay if optimizer.name == "adamw" else 1.0
    updated = []
    for p, m, v in zip(params, state["exp_avg"], state["exp_avg_sq"]):
        denom = _safe_sqrt(v / correction2) + optimizer.eps
        updated.append(decay * p - (lr / correction1) * m / denom)
    return updated


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """Square root whose derivative is 0, not infinite, where ``values`` is 0.

    A weight that never received a gradient (an unused embedding row) has v = 0, and the
    derivative of sqrt there would turn its zero contribution into NaN.
    """
    positive = values > 0
    return torch.where(positive, torch.where(positive, values, torch.ones_like(values)).sqrt(), torch.zeros_like(values))


def _state_tensors(optimizer: InnerOptimizer) -> dict[str, list[torch.Tensor]]:
    names = ("momentum",) if optimizer.name == "sgd_momentum" else ("exp_avg", "exp_avg_sq")
    return {name: [t.detach().clone() for t in optimizer._state[name]] for name in names}


def run_inner_loop_exact(
    model: torch.nn.Module,
    params: Params,
    adversary_batches: Sequence[Batch],
    learning_rates: Sequence[float],
    optimizer: InnerOptimizer,
    tr_batch: Batch,
    tr_loss_fn: LossFn,
    tr_weights: Mapping[int, float],
    truncation: int | None = None,
    clip: float | None = None,
    adversary_loss_fn: LossFn = lm_loss,
) -> InnerLoopResult:
    """Attack ``params`` for ``len(adversary_batches)`` steps and return the exact TR meta-gradient.

    Arguments match ``run_inner_loop``. ``truncation`` is T, the number of final steps
    differentiated through (all K when ``None``); tamper-resistance losses taken before them
    contribute their first-order gradient. ``clip`` rescales the summed meta-gradient to at
    most this global norm. ``params`` hold the attacked weights afterwards, detached.
    """
    steps = len(adversary_batches)
    if len(learning_rates) != steps:
        raise ValueError(f"got {steps} adversary batches but {len(learning_rates)} learning rates")
    truncation = steps if truncation is None else truncation
    if not 1 <= truncation <= steps:
        raise ValueError(f"truncation must be in [1, {steps}], got {truncation}")
    names = list(params)
    tensors = [params[n] for n in names]
    optimizer.reset(tensors)
    tr_grads = [torch.zeros_like(t) for t in tensors]
    adversary_losses: list[float] = []
    tr_losses: list[float] = []
    start = steps - truncation

    # Steps before the differentiated window: first order, in place, as run_inner_loop does.
    for k in range(start):
        loss = adversary_loss_fn(model, params, adversary_batches[k])
        optimizer.step(tensors, torch.autograd.grad(loss, tensors), learning_rates[k])
        adversary_losses.append(loss.item())
        if k in tr_weights:
            tr_loss = tr_loss_fn(model, params, tr_batch)
            tr_losses.append(tr_loss.item())
            torch._foreach_add_(tr_grads, torch.autograd.grad(tr_loss, tensors), alpha=tr_weights[k])

    # The window: weights as differentiable functions of theta_{K-T}, a fresh leaf.
    leaf = [t.detach().clone().requires_grad_(True) for t in tensors]
    current = list(leaf)
    state = _state_tensors(optimizer)
    objective = None
    for k in range(start, steps):
        weights = dict(zip(names, current))
        loss = adversary_loss_fn(model, weights, adversary_batches[k])
        grads = torch.autograd.grad(loss, current, create_graph=True)
        current = _differentiable_step(optimizer, current, grads, state, k + 1, learning_rates[k])
        adversary_losses.append(loss.item())
        if k in tr_weights:
            tr_loss = tr_loss_fn(model, dict(zip(names, current)), tr_batch)
            tr_losses.append(tr_loss.item())
            objective = tr_weights[k] * tr_loss if objective is None else objective + tr_weights[k] * tr_loss
    if objective is not None:
        torch._foreach_add_(tr_grads, torch.autograd.grad(objective, leaf))
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tr_grads))))
    if not torch.isfinite(torch.tensor(norm)):
        raise FloatingPointError(
            f"the exact meta-gradient has norm {norm}; shorten meta_truncation, raise inner_eps "
            "(Adam-type steps divide by sqrt(v) + eps), or use sgd_momentum adversaries"
        )
    if clip is not None:
        if norm > clip:
            torch._foreach_mul_(tr_grads, clip / norm)
    with torch.no_grad():
        for tensor, final in zip(tensors, current):
            tensor.copy_(final)
    return InnerLoopResult(tr_grads, adversary_losses, tr_losses, len(tr_losses))
