"""Tests of the functional attack loop against plain ``torch.optim`` training of module copies."""

import copy
import math

import pytest
import torch

from tar_lightning.data.tokenizer import train_word_tokenizer
from tar_lightning.inner_loop import (
    InnerOptimizer,
    copy_params,
    functional_forward,
    run_inner_loop,
    tr_step_weights,
)
from tar_lightning.losses import negative_entropy_loss, next_token_loss
from tar_lightning.models import LlamaSize, build_llama

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park .",
    "the bird sang a song in the tree .",
    "a fish swam in the cold lake .",
]
TINY = LlamaSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
LEARNING_RATES = [1e-2, 2e-2, 3e-2]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_word_tokenizer(SENTENCES, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def model(tokenizer):
    return build_llama(TINY, tokenizer, seed=0)


@pytest.fixture(scope="module")
def batches(tokenizer):
    """Three padded adversary batches, one per inner step, and a separate TR batch."""

    def encode(texts):
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))

    adversary = [encode(SENTENCES[:2]), encode(SENTENCES[1:3]), encode(SENTENCES[2:])]
    return adversary, encode([SENTENCES[3], SENTENCES[0]])


def entropy_tr_loss(model, params, batch):
    return negative_entropy_loss(functional_forward(model, params, batch).logits, batch["attention_mask"])


def module_tr_loss(module, batch):
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return negative_entropy_loss(logits, batch["attention_mask"])


def reference_attack(model, adversary_batches, learning_rates, tr_batch, tr_weights):
    """Attack a deep copy with torch.optim.AdamW and sum the weighted TR gradients by hand.

    Returns the attacked copy, the attacker's loss at each step, the TR losses taken and the
    weighted TR gradient of each parameter name.
    """
    attacked = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=learning_rates[0], weight_decay=0.01)
    losses, tr_losses = [], []
    tr_grads = {name: torch.zeros_like(p) for name, p in attacked.named_parameters()}
    for k, (batch, lr) in enumerate(zip(adversary_batches, learning_rates)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        logits = attacked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = next_token_loss(logits, batch["input_ids"], batch["attention_mask"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if k not in tr_weights:
            continue
        optimizer.zero_grad()
        tr_loss = module_tr_loss(attacked, tr_batch)
        tr_loss.backward()
        tr_losses.append(tr_loss.item())
        for name, p in attacked.named_parameters():
            tr_grads[name] += tr_weights[k] * p.grad
    return attacked, losses, tr_losses, tr_grads


def make_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


@pytest.mark.parametrize(
    ("name", "make_reference"),
    [
        ("adamw", lambda params: torch.optim.AdamW(params, lr=1.0, weight_decay=0.01)),
        ("adam", lambda params: torch.optim.Adam(params, lr=1.0)),
        ("sgd_momentum", lambda params: torch.optim.SGD(params, lr=1.0, momentum=0.9)),
    ],
)
def test_inner_optimizer_matches_torch_optim(name, make_reference):
    mlp = make_mlp()
    ours = [p.detach().clone() for p in mlp.parameters()]
    reference = [p.detach().clone().requires_grad_(True) for p in mlp.parameters()]
    reference_optimizer = make_reference(reference)
    optimizer = InnerOptimizer(name=name, weight_decay=0.01)
    optimizer.reset(ours)

    generator = torch.Generator().manual_seed(1)
    for step, lr in enumerate([1e-2, 5e-2, 2e-2, 1e-1]):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in ours]
        optimizer.step(ours, grads, lr)
        for group in reference_optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        reference_optimizer.step()
        for i, (mine, theirs) in enumerate(zip(ours, reference)):
            assert torch.allclose(mine, theirs.detach(), rtol=1e-12, atol=1e-14), f"{name}: parameter {i} differs after step {step}"


def test_inner_optimizer_step_before_reset_raises():
    params = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="reset"):
        InnerOptimizer().step(params, [torch.ones(3)], 0.1)


def test_inner_optimizer_unknown_name_raises():
    with pytest.raises(ValueError, match="'sgd'"):
        InnerOptimizer(name="sgd")


def test_inner_optimizer_reset_clears_state():
    params = [torch.zeros(3, dtype=torch.float64)]
    optimizer = InnerOptimizer(name="adam")
    optimizer.reset(params)
    optimizer.step(params, [torch.ones(3, dtype=torch.float64)], 0.1)

    # After a reset the first Adam step moves each coordinate by lr * g / (|g| + eps),
    # whatever state the previous attack left.
    fresh = [torch.zeros(3, dtype=torch.float64)]
    optimizer.reset(fresh)
    optimizer.step(fresh, [torch.full((3,), -2.0, dtype=torch.float64)], 0.1)
    expected = torch.full((3,), 0.1 * 2.0 / (2.0 + 1e-8), dtype=torch.float64)
    assert torch.allclose(fresh[0], expected, rtol=1e-12)


def test_run_inner_loop_matches_adamw(model, batches):
    adversary_batches, tr_batch = batches
    params = copy_params(model)

    result = run_inner_loop(
        model, params, adversary_batches, LEARNING_RATES, InnerOptimizer("adamw", weight_decay=0.01), tr_batch, entropy_tr_loss, {}
    )
    attacked, losses, _, _ = reference_attack(model, adversary_batches, LEARNING_RATES, tr_batch, {})

    for name, p in attacked.named_parameters():
        assert torch.allclose(params[name], p, rtol=1e-5, atol=1e-6), f"attacked parameter {name} differs from torch.optim.AdamW"
    assert result.adversary_losses == pytest.approx(losses, rel=1e-5)
    assert result.tr_losses == []
    assert result.tr_used == 0


def test_reused_buffers_match_fresh_run(model, batches):
    adversary_batches, tr_batch = batches
    weights = {2: 0.5}
    fresh = run_inner_loop(
        model, copy_params(model), adversary_batches, LEARNING_RATES, InnerOptimizer("adamw"), tr_batch, entropy_tr_loss, weights
    )

    # A second attack with the optimizer and gradient buffer of a first one, as the module does.
    optimizer = InnerOptimizer("adamw")
    buffer = [torch.zeros_like(p) for p in copy_params(model).values()]
    run_inner_loop(model, copy_params(model), adversary_batches, LEARNING_RATES, optimizer, tr_batch, entropy_tr_loss, weights, None, buffer)
    reused = run_inner_loop(
        model, copy_params(model), adversary_batches, LEARNING_RATES, optimizer, tr_batch, entropy_tr_loss, weights, None, buffer
    )

    assert reused.tr_grads is buffer
    for expected, actual in zip(fresh.tr_grads, reused.tr_grads):
        assert torch.equal(expected, actual)
    assert reused.adversary_losses == fresh.adversary_losses


def test_run_inner_loop_leaves_model_unchanged(model, batches):
    adversary_batches, tr_batch = batches
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}
    params = copy_params(model)

    run_inner_loop(
        model, params, adversary_batches, LEARNING_RATES, InnerOptimizer(), tr_batch, entropy_tr_loss, {2: 0.5}
    )

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), f"run_inner_loop changed the module's {name}"
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(params[embedding].detach(), original[embedding]), "the attack did not move the parameter dict"


@pytest.mark.parametrize("tr_weights", [{2: 0.5}, {0: 0.25, 2: 0.75}])
def test_run_inner_loop_tr_gradient(model, batches, tr_weights):
    adversary_batches, tr_batch = batches
    params = copy_params(model)

    result = run_inner_loop(
        model, params, adversary_batches, LEARNING_RATES, InnerOptimizer(), tr_batch, entropy_tr_loss, tr_weights
    )
    _, _, tr_losses, expected = reference_attack(model, adversary_batches, LEARNING_RATES, tr_batch, tr_weights)

    assert result.tr_used == len(tr_weights)
    assert result.tr_losses == pytest.approx(tr_losses, rel=1e-5)
    assert len(result.tr_grads) == len(params)
    for name, grad in zip(params, result.tr_grads):
        assert grad.abs().sum() > 0, f"TR gradient of {name} is zero"
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), f"TR gradient of {name} differs from the hand computation"


def test_tr_floor_skips_gradient(model, batches):
    adversary_batches, tr_batch = batches
    params = copy_params(model)

    # The negative entropy is at most 0, so a floor of 100 is above every possible TR loss.
    result = run_inner_loop(
        model, params, adversary_batches, LEARNING_RATES, InnerOptimizer(), tr_batch, entropy_tr_loss, {1: 0.5, 2: 0.5}, tr_floor=100.0
    )

    assert result.tr_used == 0
    assert len(result.tr_losses) == 2
    for name, grad in zip(params, result.tr_grads):
        assert torch.count_nonzero(grad) == 0, f"TR gradient of {name} is not zero under the floor"


def test_tr_floor_below_minimum_keeps_gradient(model, batches):
    adversary_batches, tr_batch = batches
    params = copy_params(model)
    vocab_size = model.config.vocab_size

    # The negative entropy is at least -ln(vocab size), so a floor below that skips nothing.
    result = run_inner_loop(
        model,
        params,
        adversary_batches,
        LEARNING_RATES,
        InnerOptimizer(),
        tr_batch,
        entropy_tr_loss,
        {1: 0.5, 2: 0.5},
        tr_floor=-math.log(vocab_size) - 1.0,
    )

    assert result.tr_used == 2
    assert any(torch.count_nonzero(grad) > 0 for grad in result.tr_grads)


def test_run_inner_loop_lr_count_mismatch_raises(model, batches):
    adversary_batches, tr_batch = batches
    with pytest.raises(ValueError, match="3 adversary batches but 2 learning rates"):
        run_inner_loop(
            model, copy_params(model), adversary_batches, [1e-2, 1e-2], InnerOptimizer(), tr_batch, entropy_tr_loss, {}
        )


def test_functional_forward_missing_key_raises(model, batches):
    _, batch = batches
    params = copy_params(model)
    del params["model.norm.weight"]

    with pytest.raises(RuntimeError, match="model.norm.weight"):
        functional_forward(model, params, batch)


def test_functional_forward_unexpected_key_raises(model, batches):
    _, batch = batches
    params = copy_params(model)
    params["model.extra.weight"] = torch.zeros(2)

    with pytest.raises(RuntimeError, match="model.extra.weight"):
        functional_forward(model, params, batch)


def test_copy_params_untied_has_head(model):
    params = copy_params(model)

    assert "lm_head.weight" in params
    assert set(params) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert params[name].requires_grad
        assert params[name].data_ptr() != p.data_ptr(), f"copy of {name} shares storage with the module"


def test_tied_embeddings_follow_param_dict(tokenizer, batches):
    _, batch = batches
    size = LlamaSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, tie_word_embeddings=True)
    tied = build_llama(size, tokenizer, seed=0).eval()
    embedding = "model.embed_tokens.weight"
    params = copy_params(tied)

    assert "lm_head.weight" not in params
    with torch.no_grad():
        own = tied(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        functional = functional_forward(tied, params, batch).logits
    assert torch.allclose(functional, own, atol=1e-6)

    delta = 0.5 * torch.randn(params[embedding].shape, generator=torch.Generator().manual_seed(2))
    params[embedding] = (params[embedding] + delta).detach()
    edited = copy.deepcopy(tied)
    with torch.no_grad():
        edited.model.embed_tokens.weight.add_(delta)
        expected = edited(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        changed = functional_forward(tied, params, batch).logits
    assert edited.lm_head.weight is edited.model.embed_tokens.weight
    assert torch.allclose(changed, expected, atol=1e-5), "the output head did not follow the edited embedding"

    # Guard against a vacuous check: an untied head that keeps the old matrix gives other logits.
    untied = copy.deepcopy(edited)
    untied.lm_head.weight = torch.nn.Parameter(tied.model.embed_tokens.weight.detach().clone())
    with torch.no_grad():
        stale_head = untied(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    assert not torch.allclose(changed, stale_head, atol=1e-3)


def test_tr_step_weights_uniform():
    weights = tr_step_weights(16, 4, "uniform")

    assert sorted(weights) == [3, 7, 11, 15]
    assert all(w == pytest.approx(0.25) for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0)


def test_tr_step_weights_uneven_division():
    # Counted back from the last step, so the fully attacked weights are always scored.
    weights = tr_step_weights(10, 4, "uniform")

    assert sorted(weights) == [1, 5, 9]
    assert sum(weights.values()) == pytest.approx(1.0)


def test_tr_step_weights_every_step():
    assert tr_step_weights(3, 1, "uniform") == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    assert tr_step_weights(5, 5, "uniform") == {4: 1.0}


def test_tr_step_weights_exponential():
    weights = tr_step_weights(16, 4, "exponential")

    assert sorted(weights) == [3, 7, 11, 15]
    assert weights[15] == pytest.approx(1.0)
    assert weights[11] == pytest.approx(math.exp(0.0625 * (11 - 15)))
    assert weights[3] == pytest.approx(math.exp(0.0625 * (3 - 15)))
    assert tr_step_weights(16, 4, "exponential", rate=0.5)[7] == pytest.approx(math.exp(0.5 * (7 - 15)))


@pytest.mark.parametrize(("inner_steps", "tr_every"), [(16, 0), (16, 17), (0, 1), (16, -4)])
def test_tr_step_weights_invalid_tr_every_raises(inner_steps, tr_every):
    with pytest.raises(ValueError, match="tr_every"):
        tr_step_weights(inner_steps, tr_every, "uniform")


def test_tr_step_weights_unknown_weighting_raises():
    with pytest.raises(ValueError, match="'linear'"):
        tr_step_weights(16, 4, "linear")


def test_low_rank_adversary_matches_peft_style_reference(model, batches):
    from tar_lightning.inner_loop import LowRankAdversary

    adversary, tr_batch = batches
    low_rank = LowRankAdversary(rank=2, alpha=4.0, targets=("q_proj.weight", "v_proj.weight"))
    params = copy_params(model)
    original = {name: t.detach().clone() for name, t in params.items()}
    weights = {2: 1.0}

    result = run_inner_loop(
        model, params, adversary, [0.05] * 3, InnerOptimizer("sgd_momentum"), tr_batch, entropy_tr_loss, weights,
        low_rank=low_rank, generator=torch.Generator().manual_seed(7),
    )

    # Replay by hand: the same factors, heavy-ball SGD on A and B only, then the TR gradient
    # with respect to the attacked weights W + (alpha / r) B A.
    factors = low_rank.factors(original, torch.Generator().manual_seed(7))
    trained = [t for pair in factors.values() for t in pair]
    momentum = [torch.zeros_like(t) for t in trained]
    frozen = {name: t.clone() for name, t in original.items()}
    for batch in adversary:
        loss = next_token_loss(functional_forward(model, low_rank.apply(frozen, factors), batch).logits, batch["input_ids"], batch["attention_mask"])
        grads = torch.autograd.grad(loss, trained)
        with torch.no_grad():
            for tensor, buffer, grad in zip(trained, momentum, grads):
                buffer.mul_(0.9).add_(grad)
                tensor.sub_(0.05 * buffer)
    attacked = {name: t.detach().clone().requires_grad_(True) for name, t in low_rank.apply(frozen, factors).items()}
    expected = torch.autograd.grad(entropy_tr_loss(model, attacked, tr_batch), list(attacked.values()))

    for got, want in zip(result.tr_grads, expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    for name in params:
        assert torch.equal(params[name], original[name]), f"{name} changed: a LoRA attacker must not write the weights"
    # B starts at zero, so the first step uses the weights themselves.
    first = next_token_loss(functional_forward(model, original, adversary[0]).logits, adversary[0]["input_ids"], adversary[0]["attention_mask"])
    assert result.adversary_losses[0] == pytest.approx(first.item(), rel=1e-6)
    assert len(result.adversary_losses) == 3
    assert result.tr_used == 1


def test_low_rank_adversary_without_targets_raises(model, batches):
    from tar_lightning.inner_loop import LowRankAdversary

    adversary, tr_batch = batches
    with pytest.raises(ValueError, match="no 2-D parameter name ends with one of \\('nothing.weight',\\)"):
        run_inner_loop(
            model, copy_params(model), adversary, [0.1] * 3, InnerOptimizer(), tr_batch, entropy_tr_loss, {2: 1.0},
            low_rank=LowRankAdversary(targets=("nothing.weight",)),
        )
