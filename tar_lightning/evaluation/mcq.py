"""Multiple-choice accuracy by comparing the log-likelihood of each option.

Each option is scored as a continuation of the question: the question and ``" " + option`` are
tokenized together, exactly as running text is, and the option's score is the summed
log-probability of the tokens after the question's own tokens. Sequences are padded on the
right whatever the tokenizer's ``padding_side``, so under the causal mask no real position
attends to padding and the scores do not depend on the batch size. Tokenizing the two together
scores the option's tokens as they occur in text: with a BPE tokenizer that is the
leading-space variant (" Paris"), not the bare word. A sequence longer than the model's context
loses tokens from the start of the question, never the answer cue or the option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchmetrics.classification import MulticlassAccuracy


@dataclass
class Accuracy:
    """Accuracy over ``count`` questions with its binomial standard error."""

    value: float
    stderr: float
    count: int


def _continuation_ids(tokenizer, question: str, choice: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Return the token ids of question + option, and where the option's tokens start.

    Beyond ``max_length`` tokens, tokens after the first (usually BOS) are dropped from the
    start of the question, so the end of the question (the answer cue) and the option stay.
    """
    prompt = tokenizer(question)["input_ids"]
    full = tokenizer(question + " " + choice)["input_ids"]
    start = 0
    while start < min(len(prompt), len(full)) and prompt[start] == full[start]:
        start += 1
    if start == len(full):
        raise ValueError(f"option {choice!r} adds no tokens to question {question!r}")
    start = max(start, 1)
    if max_length is not None and len(full) > max_length:
        option_length = len(full) - start
        if option_length + 2 > max_length:
            raise ValueError(f"option {choice!r} is {option_length} tokens; it does not fit a context of {max_length} after a cue")
        cut = len(full) - max_length
        full = full[:1] + full[1 + cut :]
        start -= cut
    return full, start


@torch.no_grad()
def choice_log_likelihoods(
    model, tokenizer, questions: list[dict], batch_size: int = 256, max_length: int | None = None
) -> torch.Tensor:
    """Return a (questions, max options) tensor of option log-likelihoods, ``-inf`` where absent.

    ``max_length`` defaults to the model's ``max_position_embeddings``.
    """
    if not questions:
        raise ValueError("no questions to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    sequences, owners = [], []
    for qi, row in enumerate(questions):
        for ci, choice in enumerate(row["choices"]):
            sequences.append(_continuation_ids(tokenizer, row["question"], choice, max_length))
            owners.append((qi, ci))

    width = max(len(row["choices"]) for row in questions)
    scores = torch.full((len(questions), width), float("-inf"))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()

    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        for i, (ids, start) in enumerate(chunk):
            targets = torch.tensor(ids[start:], device=device)
            # Position t predicts token t + 1; only the option's positions are normalised.
            log_probs = torch.log_softmax(logits[i, start - 1 : len(ids) - 1].float(), dim=-1)
            picked = log_probs.gather(-1, targets[:, None])
            qi, ci = owners[begin + i]
            scores[qi, ci] = picked.sum()

    model.train(was_training)
    return scores


def multiple_choice_accuracy(
    model, tokenizer, questions: list[dict], batch_size: int = 256, max_length: int | None = None
) -> Accuracy:
    """Return the fraction of ``questions`` whose highest-likelihood option is the correct one."""
    if not questions:
        raise ValueError("no questions to score")
    scores = choice_log_likelihoods(model, tokenizer, questions, batch_size, max_length)
    answers = torch.tensor([row["answer"] for row in questions])
    metric = MulticlassAccuracy(num_classes=scores.shape[1], average="micro")
    value = float(metric(scores.argmax(dim=1), answers))
    return Accuracy(value, math.sqrt(value * (1.0 - value) / len(questions)), len(questions))
