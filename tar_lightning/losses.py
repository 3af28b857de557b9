"""Losses of tamper-resistance training. Pure tensor functions, no Lightning.

Shapes: ``logits`` is (batch, seq, vocab), ``input_ids`` and ``attention_mask`` are
(batch, seq), hidden states are tuples of (batch, seq, hidden), one per layer with the
embedding output first. Position t of the logits predicts token t + 1, so every loss over
predictions uses the mask of the *target* tokens, ``attention_mask[:, 1:]``: padding never
counts, unlike a plain mean over all positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each real next token."""
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return _masked_mean(losses.view_as(targets), attention_mask[:, 1:])


def masked_entropy(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distribution at positions that predict a real token."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return _masked_mean(entropy, attention_mask[:, 1:])


def negative_entropy_loss(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Tamper-resistance loss for knowledge restriction: minimising it maximises entropy.

    Its minimum is ``-ln(vocab size)``, reached by the uniform distribution.
    """
    return -masked_entropy(logits, attention_mask)


def sequence_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's tokens where ``loss_mask`` is 1; shape (batch,).

    ``loss_mask`` marks the scored tokens themselves (a completion, not its prompt or
    padding), so position t of the logits contributes when ``loss_mask[:, t + 1]`` is 1.
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (picked * loss_mask[:, 1:].to(picked.dtype)).sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean sigmoid DPO loss over pairs, from summed completion log-probabilities of shape (pairs,).

    loss = -log sigmoid(beta * ((log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)))), as in
    "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" and the
    harmful-request-refusal objective of "Tamper-Resistant Safeguards for Open-Weight LLMs".
    Minimising it raises the chosen completion's likelihood relative to the rejected one.
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()


def representation_distance(
    hidden_states: tuple[torch.Tensor, ...],
    base_hidden_states: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean over layers and real tokens of ``||h - h_base|| / ||h_base||``.

    The paper "Tamper-Resistant Safeguards for Open-Weight LLMs" uses the plain L2 distance.
    A small Llama's residual stream reaches norms in the thousands, so that distance (and its
    gradient) drowns every other term; dividing by the base model's norm keeps the term near 1
    whatever the scale. The first position is skipped because the hidden state of the
    beginning-of-sequence token is huge and carries no content.
    """
    mask = attention_mask[:, 1:]
    per_layer = []
    for h, h_base in zip(hidden_states, base_hidden_states, strict=True):
        h, h_base = h[:, 1:].float(), h_base[:, 1:].float()
        relative = (h - h_base).norm(dim=-1) / h_base.norm(dim=-1).clamp_min(eps)
        per_layer.append(_masked_mean(relative, mask))
    return torch.stack(per_layer).mean()


def random_mapping_loss(
    hidden_states: tuple[torch.Tensor, ...],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    table: torch.Tensor,
) -> torch.Tensor:
    """Mean over layers and real tokens of ``1 - |cos(h, R[token])|``.

    ``table`` is the fixed Gaussian matrix R of shape (vocab, hidden). Minimising this pushes
    every hidden state of forget text toward a random direction chosen by its token.
    """
    targets = table[input_ids].float()
    per_layer = []
    for h in hidden_states:
        cosine = F.cosine_similarity(h.float(), targets, dim=-1)
        per_layer.append(_masked_mean(1.0 - cosine.abs(), attention_mask))
    return torch.stack(per_layer).mean()


def gradient_surrogate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Return ``sum_p <p, g_p>`` with ``grads`` detached: a scalar whose gradient is ``grads``.

    Adding it to a loss before ``backward()`` adds a precomputed gradient, such as the
    tamper-resistance gradient, through autograd. A data-parallel strategy then averages it
    across processes, which writing into ``.grad`` after backward would skip.
    """
    return sum(torch.dot(p.flatten(), g.detach().flatten()) for p, g in zip(params, grads, strict=True))


def negative_cross_entropy_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Tamper-resistance loss variant for knowledge restriction: minus the next-token loss of x_TR.

    Minimising it maximises the attacked model's cross-entropy on forget text. The authors of
    "Tamper-Resistant Safeguards for Open-Weight LLMs" report it unstable, with an effect that
    vanishes once an attack runs longer than K, so they chose the entropy loss. It is kept so
    that the comparison can be rerun. It has no lower bound.
    """
    return -next_token_loss(logits, input_ids, attention_mask)
