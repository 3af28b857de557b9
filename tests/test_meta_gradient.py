"""The exact meta-gradient against finite differences on a two-layer MLP, in float64."""

import pytest
import torch
from torch.func import functional_call

from tar_lightning.inner_loop import InnerOptimizer, tr_step_weights
from tar_lightning.meta_gradient import run_inner_loop_exact

STEPS = 4


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(3, 5)
        self.out = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def regression_loss(model, params, batch):
    prediction = functional_call(model, params, (batch["x"],))
    return ((prediction - batch["y"]) ** 2).mean()


def tr_loss(model, params, batch):
    # A loss the attacker does not train on: its gradient depends on the attacked weights.
    prediction = functional_call(model, params, (batch["x"],))
    return (prediction[:, 0] * batch["y"][:, 1]).mean() + 0.1 * (prediction**2).mean()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLP().double()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = [{"x": torch.randn(6, 3, dtype=torch.float64), "y": torch.randn(6, 2, dtype=torch.float64)} for _ in range(STEPS)]
    tr_batch = {"x": torch.randn(6, 3, dtype=torch.float64), "y": torch.randn(6, 2, dtype=torch.float64)}
    return model, params, batches, tr_batch


def _objective(model, params, batches, lrs, optimizer, tr_batch, weights) -> float:
    """Weighted TR losses after the steps in ``weights``, from plain (non-differentiated) steps."""
    attacked = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    tensors = list(attacked.values())
    optimizer.reset(tensors)
    total = 0.0
    for k, batch in enumerate(batches):
        loss = regression_loss(model, attacked, batch)
        optimizer.step(tensors, torch.autograd.grad(loss, tensors), lrs[k])
        if k in weights:
            total += weights[k] * tr_loss(model, attacked, tr_batch).item()
    return total


@pytest.mark.parametrize(
    ("name", "lr", "eps"),
    [("sgd_momentum", 0.1, 1e-8), ("adam", 0.01, 1e-3), ("adamw", 0.01, 1e-3)],
)
def test_full_unroll_matches_finite_differences(setup, name, lr, eps):
    model, params, batches, tr_batch = setup
    weights = tr_step_weights(STEPS, 2, "uniform")
    lrs = [lr] * STEPS

    def optimizer():
        return InnerOptimizer(name, eps=eps, weight_decay=0.01)

    copies = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    result = run_inner_loop_exact(model, copies, batches, lrs, optimizer(), tr_batch, tr_loss, weights, adversary_loss_fn=regression_loss)

    torch.manual_seed(1)
    for _ in range(3):
        direction = {k: torch.randn_like(v) for k, v in params.items()}
        h = 1e-6
        plus = _objective(model, {k: v + h * direction[k] for k, v in params.items()}, batches, lrs, optimizer(), tr_batch, weights)
        minus = _objective(model, {k: v - h * direction[k] for k, v in params.items()}, batches, lrs, optimizer(), tr_batch, weights)
        numeric = (plus - minus) / (2 * h)
        analytic = sum((g * direction[k]).sum().item() for g, k in zip(result.tr_grads, params))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_truncation_to_last_step_differentiates_one_step(setup):
    model, params, batches, tr_batch = setup
    weights = {STEPS - 1: 1.0}
    lr = 0.1
    copies = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    result = run_inner_loop_exact(
        model, copies, batches, [lr] * STEPS, InnerOptimizer("sgd_momentum", momentum=0.0), tr_batch, tr_loss, weights, truncation=1, adversary_loss_fn=regression_loss
    )

    # With plain SGD the truncated gradient is that of phi -> tr_loss(phi - lr * grad(phi))
    # at phi = theta_{K-1}, the weights before the last step.
    before_last = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    tensors = list(before_last.values())
    sgd = InnerOptimizer("sgd_momentum", momentum=0.0)
    sgd.reset(tensors)
    for batch in batches[:-1]:
        sgd.step(tensors, torch.autograd.grad(regression_loss(model, before_last, batch), tensors), lr)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in before_last.items()}
    grads = torch.autograd.grad(regression_loss(model, phi, batches[-1]), list(phi.values()), create_graph=True)
    stepped = {k: v - lr * g for (k, v), g in zip(phi.items(), grads)}
    expected = torch.autograd.grad(tr_loss(model, stepped, tr_batch), list(phi.values()))
    for got, want in zip(result.tr_grads, expected):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_attacked_weights_match_first_order_loop(setup):
    model, params, batches, tr_batch = setup
    weights = tr_step_weights(STEPS, 1, "uniform")
    exact = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    first_order = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    exact_result = run_inner_loop_exact(model, exact, batches, [0.01] * STEPS, InnerOptimizer("adamw"), tr_batch, tr_loss, weights, truncation=2, adversary_loss_fn=regression_loss)
    # run_inner_loop always trains with the LM loss, so compare against the same steps taken by hand.
    tensors = list(first_order.values())
    optimizer = InnerOptimizer("adamw")
    optimizer.reset(tensors)
    for batch in batches:
        optimizer.step(tensors, torch.autograd.grad(regression_loss(model, first_order, batch), tensors), 0.01)

    for name in params:
        assert torch.allclose(exact[name], first_order[name], rtol=1e-10, atol=1e-12)
    assert len(exact_result.tr_losses) == STEPS
    assert len(exact_result.adversary_losses) == STEPS


def test_clip_bounds_the_meta_gradient_norm(setup):
    model, params, batches, tr_batch = setup
    copies = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    result = run_inner_loop_exact(
        model, copies, batches, [0.1] * STEPS, InnerOptimizer("sgd_momentum"), tr_batch, tr_loss, {STEPS - 1: 1.0}, clip=1e-3, adversary_loss_fn=regression_loss
    )

    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in result.tr_grads])).item()
    assert norm == pytest.approx(1e-3)


@pytest.mark.parametrize("truncation", [0, STEPS + 1])
def test_truncation_out_of_range_raises(setup, truncation):
    model, params, batches, tr_batch = setup

    with pytest.raises(ValueError, match=f"truncation must be in \\[1, {STEPS}\\]"):
        run_inner_loop_exact(model, dict(params), batches, [0.1] * STEPS, InnerOptimizer(), tr_batch, tr_loss, {0: 1.0}, truncation=truncation)



def test_adam_meta_gradient_finite_without_gradient(setup):
    model, params, batches, tr_batch = setup
    for batch in batches:
        batch["x"][:, 2] = 0.0  # the hidden layer's weights of input 2 get no adversary gradient
    copies = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    result = run_inner_loop_exact(
        model, copies, batches, [0.01] * STEPS, InnerOptimizer("adam"), tr_batch, tr_loss, {STEPS - 1: 1.0}, adversary_loss_fn=regression_loss
    )

    assert all(torch.isfinite(g).all() for g in result.tr_grads)
    hidden = list(params).index("hidden.weight")
    assert result.tr_grads[hidden][:, 2].abs().sum() > 0, "the TR loss still depends on those weights directly"
