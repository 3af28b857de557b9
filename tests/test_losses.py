"""Tests of the tamper-resistance losses against values computed by hand."""

import math

import pytest
import torch

from tar_lightning.losses import (
    dpo_loss,
    gradient_surrogate,
    masked_entropy,
    negative_entropy_loss,
    next_token_loss,
    random_mapping_loss,
    representation_distance,
    sequence_log_probs,
)

# Two rows of three tokens, the second padded at its last position.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def logits_from_probs(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def entropy(probs):
    return -sum(p * math.log(p) for p in probs)


def test_masked_entropy_hand_value():
    uniform = [0.25, 0.25, 0.25, 0.25]
    skewed = [0.5, 0.25, 0.125, 0.125]
    peaked = [0.7, 0.1, 0.1, 0.1]
    sharp = [0.97, 0.01, 0.01, 0.01]
    # Position t predicts token t + 1: the last position of every row predicts nothing, and
    # position 1 of row 1 predicts a padding token, so only three positions count.
    logits = torch.stack(
        [
            logits_from_probs([skewed, uniform, sharp]),
            logits_from_probs([peaked, uniform, uniform]),
        ]
    )

    expected = (1.75 * math.log(2) + 2 * math.log(2) + entropy(peaked)) / 3
    assert masked_entropy(logits, MASK).item() == pytest.approx(expected, rel=1e-6)
    assert negative_entropy_loss(logits, MASK).item() == pytest.approx(-expected, rel=1e-6)


def test_masked_entropy_ignores_padding():
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    changed = logits.clone()
    changed[1, 1] = torch.tensor([9.0, -9.0, 0.0, 3.0])
    changed[:, 2] = torch.tensor([5.0, 0.0, 0.0, 0.0])

    assert masked_entropy(changed, MASK).item() == pytest.approx(masked_entropy(logits, MASK).item(), rel=1e-6)


def test_negative_entropy_minimum_is_uniform():
    logits = torch.zeros(2, 3, 7)

    assert negative_entropy_loss(logits, MASK).item() == pytest.approx(-math.log(7), rel=1e-6)


def test_next_token_loss_hand_value():
    input_ids = torch.tensor([[0, 1, 2], [0, 1, 3]])
    # Probability each counted position gives its target: row 0 predicts 1 then 2, row 1
    # predicts 1. Row 1 position 1 would predict the padded token 3 with probability 0.01.
    logits = torch.stack(
        [
            logits_from_probs([[0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]),
            logits_from_probs([[0.1, 0.8, 0.05, 0.05], [0.33, 0.33, 0.33, 0.01], [0.25, 0.25, 0.25, 0.25]]),
        ]
    )

    expected = -(math.log(0.5) + math.log(0.25) + math.log(0.8)) / 3
    assert next_token_loss(logits, input_ids, MASK).item() == pytest.approx(expected, rel=1e-6)


def test_next_token_loss_ignores_padded_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator)
    input_ids = torch.tensor([[0, 1, 2], [0, 3, 4]])
    loss = next_token_loss(logits, input_ids, MASK).item()

    changed_ids = input_ids.clone()
    changed_ids[1, 2] = 0
    changed_logits = logits.clone()
    changed_logits[1, 1] = torch.randn(5, generator=generator) * 10

    assert next_token_loss(changed_logits, changed_ids, MASK).item() == pytest.approx(loss, rel=1e-6)


def test_next_token_loss_counts_real_targets():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[0, 1, 2], [0, 3, 4]])
    changed_ids = input_ids.clone()
    changed_ids[1, 1] = 2

    assert next_token_loss(logits, changed_ids, MASK).item() != pytest.approx(next_token_loss(logits, input_ids, MASK).item())


def test_representation_distance_identical_is_zero():
    states = tuple(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))

    assert representation_distance(states, states, MASK).item() == 0.0


def hidden_with_offsets(offsets):
    """Hidden states (2, 3, 2) equal to [3, 4] (norm 5) plus offsets[row][pos] * [1, 0]."""
    base = torch.tensor([3.0, 4.0]).expand(2, 3, 2)
    return base + torch.tensor(offsets)[..., None] * torch.tensor([1.0, 0.0])


def test_representation_distance_hand_value():
    base = torch.tensor([3.0, 4.0]).expand(2, 3, 2).clone()
    # Position 0 and the padded position 2 of row 1 get offsets of 100, which would dominate
    # the mean if they counted. The relative distance of a counted position is |offset| / 5.
    layer_0 = hidden_with_offsets([[100.0, 3.0, 5.0], [100.0, 1.0, 100.0]])
    layer_1 = hidden_with_offsets([[100.0, 10.0, -10.0], [100.0, 10.0, 100.0]])

    distance = representation_distance((layer_0, layer_1), (base, base), MASK)

    layer_0_mean = (3 / 5 + 5 / 5 + 1 / 5) / 3
    layer_1_mean = 10 / 5
    assert distance.item() == pytest.approx((layer_0_mean + layer_1_mean) / 2, rel=1e-6)


def test_representation_distance_layer_count_mismatch_raises():
    states = (torch.ones(2, 3, 2), torch.ones(2, 3, 2))

    with pytest.raises(ValueError):
        representation_distance(states, states[:1], MASK)


def test_random_mapping_loss_hand_value():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    input_ids = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[1, 1, 0]])
    # Layer 0: [1, 1] against R[1] = [0, 1] has cos 1/sqrt(2), and [-1, -1] against R[2]
    # has cos -1, so |cos| = 1. Position 2 is padding, with cos 0 against R[0].
    layer_0 = torch.tensor([[[1.0, 1.0], [-1.0, -1.0], [0.0, 1.0]]])
    # Layer 1: [1, 0] against R[1] has cos 0, and [2, 0] against R[2] has cos 1/sqrt(2).
    layer_1 = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])

    loss = random_mapping_loss((layer_0, layer_1), input_ids, mask, table)

    root_half = 1 / math.sqrt(2)
    layer_0_mean = ((1 - root_half) + 0.0) / 2
    layer_1_mean = (1.0 + (1 - root_half)) / 2
    assert loss.item() == pytest.approx((layer_0_mean + layer_1_mean) / 2, rel=1e-6)


def test_random_mapping_loss_aligned_is_zero():
    table = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[0, 3, 4], [2, 1, 0]])
    hidden = 2.5 * table[input_ids]

    assert random_mapping_loss((hidden, -hidden), input_ids, MASK, table).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_surrogate_adds_given_gradient():
    torch.manual_seed(0)
    weight = torch.randn(3, 2, requires_grad=True)
    bias = torch.randn(2, requires_grad=True)
    extra = [torch.randn(3, 2), torch.randn(2)]
    inputs = torch.randn(4, 3)

    loss = (inputs @ weight + bias).pow(2).mean()
    expected = torch.autograd.grad(2.0 * loss, [weight, bias])

    loss = (inputs @ weight + bias).pow(2).mean()
    combined = 2.0 * loss + gradient_surrogate([weight, bias], extra)
    combined.backward()

    assert torch.allclose(weight.grad, expected[0] + extra[0])
    assert torch.allclose(bias.grad, expected[1] + extra[1])


def test_negative_cross_entropy_is_minus_next_token_loss():
    from tar_lightning.losses import negative_cross_entropy_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])

    # Real targets: tokens 2 and 3 of row 0, token 5 of row 1.
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = (log_probs[0, 0, 2] + log_probs[0, 1, 3] + log_probs[1, 0, 5]) / 3
    assert negative_cross_entropy_loss(logits, input_ids, attention_mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sequence_log_probs_counts_masked_tokens_only():
    input_ids = torch.tensor([[0, 1, 2], [0, 3, 1]])
    # Row 0 scores tokens 1 and 2; row 1 scores only token 3 (its last token is masked out).
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    logits = torch.stack(
        [
            logits_from_probs([[0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]),
            logits_from_probs([[0.1, 0.1, 0.2, 0.6], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]),
        ]
    )

    log_probs = sequence_log_probs(logits, input_ids, loss_mask)

    assert log_probs.shape == (2,)
    assert log_probs[0].item() == pytest.approx(math.log(0.5) + math.log(0.25), rel=1e-6)
    assert log_probs[1].item() == pytest.approx(math.log(0.6), rel=1e-6)


def test_dpo_loss_hand_value():
    policy_chosen = torch.tensor([-4.0, -10.0])
    policy_rejected = torch.tensor([-12.0, -3.0])
    reference_chosen = torch.tensor([-5.0, -8.0])
    reference_rejected = torch.tensor([-10.0, -6.0])
    # Pair 0: margin (-4 + 5) - (-12 + 10) = 3. Pair 1: margin (-10 + 8) - (-3 + 6) = -5.
    # With beta 0.1: -log sigmoid(0.3) and -log sigmoid(-0.5), averaged.
    expected = (math.log(1 + math.exp(-0.3)) + math.log(1 + math.exp(0.5))) / 2

    loss = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)

    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_at_reference_is_log_two():
    values = torch.tensor([-7.0, -2.0, -9.0])

    assert dpo_loss(values, values - 1, values, values - 1, beta=0.1).item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_loss_gradient_raises_chosen():
    chosen = torch.tensor([-6.0], requires_grad=True)
    rejected = torch.tensor([-6.0], requires_grad=True)

    dpo_loss(chosen, rejected, torch.tensor([-6.0]), torch.tensor([-6.0]), beta=0.1).backward()

    # At the reference, d loss / d chosen = -beta * sigmoid(0) = -0.05 and the opposite for rejected.
    assert chosen.grad.item() == pytest.approx(-0.05, rel=1e-6)
    assert rejected.grad.item() == pytest.approx(0.05, rel=1e-6)
