"""Preference pairs (prompt, chosen, rejected): loading, tokenizing and sampling.

The harmful-request-refusal objective takes its tamper-resistance loss (DPO) on such pairs,
with the refusal as ``chosen`` and the harmful completion as ``rejected``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from tar_lightning.data.chat import chat_prompt, chat_text, completion_start
from tar_lightning.data.sources import checked_table, load_table
from tar_lightning.losses import sequence_log_probs
from tar_lightning.errors import ConfigError

log = logging.getLogger("tar_lightning")


@dataclass
class PreferenceSource:
    """A preference data set with one pair per row.

    The built-in world writes ``prompt``, ``chosen`` and ``rejected`` columns, as Toxic-DPO
    (``unalignment/toxic-dpo-v0.2``) has. The Anthropic HH "golden" pairs
    (``Unified-Language-Model-Alignment/Anthropic_HH_Golden``) have only ``chosen`` and
    ``rejected``, each a whole conversation; set ``prompt_column`` to ``null`` for them.

    Args:
        path: Local file or folder (JSONL, JSON, CSV, Parquet) or a hub dataset name.
        prompt_column: Column with the request. ``None`` takes the longest common prefix of
            the chosen and rejected texts as the request, cut back to a whitespace.
        chosen_column: Column with the preferred response.
        rejected_column: Column with the dispreferred response.
        split: Split to read; local files have the single split ``train``.
        subset: Hub configuration name, if the dataset has several.
        max_rows: Read at most this many rows (all when ``None``).
    """

    path: str
    prompt_column: str | None = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    split: str = "train"
    subset: str | None = None
    max_rows: int | None = None


@dataclass
class PreferencePair:
    """One request with a preferred and a dispreferred response."""

    prompt: str
    chosen: str
    rejected: str


def _split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    prefix = os.path.commonprefix([chosen, rejected])
    cut = max(prefix.rfind(" "), prefix.rfind("\n")) + 1 if len(prefix) < min(len(chosen), len(rejected)) else len(prefix)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def load_preferences(source: PreferenceSource) -> list[PreferencePair]:
    """Return the pairs of ``source``; raise ``ConfigError`` on a missing column, no rows or an empty response."""
    columns = [c for c in (source.prompt_column, source.chosen_column, source.rejected_column) if c is not None]
    table = checked_table(load_table(source.path, source.split, source.subset), source.path, columns, source.max_rows)
    pairs = []
    for i, row in enumerate(table):
        chosen, rejected = str(row[source.chosen_column]), str(row[source.rejected_column])
        if source.prompt_column is None:
            prompt, chosen, rejected = _split_common_prefix(chosen, rejected)
        else:
            prompt = str(row[source.prompt_column])
        if not chosen.strip() or not rejected.strip():
            raise ConfigError(
                f"dataset {source.path!r} row {i}: the chosen or rejected response is empty; "
                "remove the row or check the column options"
            )
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


class PreferencePool:
    """Tokenized pairs, rendered with the chat template and sampled in random batches.

    A batch of ``n`` pairs has ``input_ids``, ``attention_mask`` and ``loss_mask`` of shape
    (2n, width): rows ``0..n-1`` are the chosen exchanges and rows ``n..2n-1`` the rejected
    ones. ``loss_mask`` marks the response tokens and the end-of-sequence token, not the
    prompt or padding. ``index`` (n,) holds the pairs' positions in the pool, so a cache of
    reference log-probabilities can be looked up. Pairs whose response is cut off entirely
    by ``max_length`` are dropped with a warning.
    """

    def __init__(self, pairs: list[PreferencePair], tokenizer, max_length: int):
        if not pairs:
            raise ValueError("cannot build a preference pool from an empty list of pairs")
        chosen, rejected, fitting = [], [], []
        for pair in pairs:
            rows = [self._encode(tokenizer, pair.prompt, response, max_length) for response in (pair.chosen, pair.rejected)]
            if all(row is not None for row in rows):
                chosen.append(rows[0])
                rejected.append(rows[1])
                fitting.append(pair)
        if not fitting:
            raise ConfigError(f"every preference pair is longer than max_length={max_length}; raise data.max_length")
        if len(fitting) < len(pairs):
            dropped = len(pairs) - len(fitting)
            log.warning("preferences: dropped %d of %d pairs whose response does not fit max_length=%d", dropped, len(pairs), max_length)
        self.pairs = fitting
        width = max(len(ids) for ids, _ in chosen + rejected)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.input_ids = torch.full((2, len(fitting), width), pad, dtype=torch.long)
        self.attention_mask = torch.zeros((2, len(fitting), width), dtype=torch.long)
        self.loss_mask = torch.zeros((2, len(fitting), width), dtype=torch.long)
        for side, encoded in enumerate((chosen, rejected)):
            for i, (ids, start) in enumerate(encoded):
                self.input_ids[side, i, : len(ids)] = torch.tensor(ids)
                self.attention_mask[side, i, : len(ids)] = 1
                self.loss_mask[side, i, start : len(ids)] = 1
        self.lengths = self.attention_mask.sum(dim=2).max(dim=0).values

    @staticmethod
    def _encode(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int] | None:
        ids = tokenizer(chat_text(prompt, response, tokenizer.eos_token), truncation=True, max_length=max_length)["input_ids"]
        start = completion_start(tokenizer, chat_prompt(prompt), ids)
        return (ids, start) if start < len(ids) else None

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the pairs at ``index``, trimmed to the longest row among them."""
        width = int(self.lengths[index].max())
        return {
            "input_ids": self.input_ids[:, index, :width].flatten(0, 1),
            "attention_mask": self.attention_mask[:, index, :width].flatten(0, 1),
            "loss_mask": self.loss_mask[:, index, :width].flatten(0, 1),
            "index": index,
        }

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``batch_size`` pairs with replacement."""
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator))

    def batches(self, batch_size: int):
        """Yield every pair once, in order, ``batch_size`` pairs at a time."""
        for begin in range(0, len(self), batch_size):
            yield self.batch(torch.arange(begin, min(begin + batch_size, len(self))))


@torch.no_grad()
def preference_log_probs(model: torch.nn.Module, pool: PreferencePool, batch_size: int = 64) -> torch.Tensor:
    """Return the summed response log-probabilities of every pair in ``pool``, shape (pairs, 2), chosen first."""
    device = next(model.parameters()).device
    rows = []
    for batch in pool.batches(batch_size):
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        chosen, rejected = sequence_log_probs(logits, batch["input_ids"].to(device), batch["loss_mask"].to(device)).chunk(2)
        rows.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(rows).cpu()
