"""The data of tamper-resistance training: retain text, x_TR (text or preference pairs) and the adversaries' corpora."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from tar_lightning.errors import ConfigError
from tar_lightning.data.preferences import PreferencePool, PreferenceSource, load_preferences
from tar_lightning.data.sources import QuestionSource, TextSource, TokenPool, load_questions, load_texts
from tar_lightning.models import load_tokenizer


class _OuterBatches(IterableDataset):
    """Endless pairs of a retain batch and a tamper-resistance batch, one pair per outer step."""

    def __init__(self, retain: TokenPool, tr: TokenPool | PreferencePool, retain_batch_size: int, tr_batch_size: int, seed: int, length: int):
        self.retain, self.tr = retain, tr
        self.retain_batch_size, self.tr_batch_size = retain_batch_size, tr_batch_size
        self.seed, self.length = seed, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield {
                "retain": self.retain.sample(self.retain_batch_size, generator),
                "tr": self.tr.sample(self.tr_batch_size, generator),
            }


class TARDataModule(L.LightningDataModule):
    """Forget, retain and adversary data for tamper-resistance training.

    Each training batch is a dict with a ``retain`` batch (for the retain loss) and a ``tr``
    batch (x_TR for the tamper-resistance loss): held-out forget text, or held-out preference
    pairs when ``preferences`` is set (see ``PreferencePool`` for that batch's layout). The
    adversaries' corpora are exposed as ``adversary_pools``, from which the module draws the
    K inner-step batches of the adversary it samples. Chat sources (``response_column`` set)
    are rendered with the chat template and the tokenizer's end-of-sequence token.

    Args:
        tokenizer: Directory or hub name of the tokenizer (usually the model's directory).
        retain: Retain text for the retain loss.
        tamper_resistance: Held-out forget text (x_TR) for the entropy loss, never used by
            adversaries. Set exactly one of ``tamper_resistance`` and ``preferences``.
        adversary: Named corpora that adversaries train on, for example ``forget_a``,
            ``forget_b`` and ``retain``; adversary configs refer to them by name.
        preferences: Held-out preference pairs (x_TR) for the DPO loss, never used by
            adversaries.
        eval_questions: Named multiple-choice sets scored during training and logged as
            ``eval/<name>_acc``.
        max_length: Sequences are truncated to this many tokens.
        retain_batch_size: Sequences per retain batch.
        tr_batch_size: Sequences per x_TR batch.
        seed: Seed of batch sampling.
    """

    def __init__(
        self,
        tokenizer: str,
        retain: TextSource,
        tamper_resistance: TextSource | None = None,
        adversary: dict[str, TextSource] | None = None,
        eval_questions: dict[str, QuestionSource] | None = None,
        max_length: int = 64,
        retain_batch_size: int = 32,
        tr_batch_size: int = 32,
        seed: int = 0,
        preferences: PreferenceSource | None = None,
    ):
        super().__init__()
        problems = []
        if not adversary:
            problems.append("data.adversary must name at least one corpus")
        if (tamper_resistance is None) == (preferences is None):
            problems.append(
                "set exactly one of data.tamper_resistance (text, entropy loss) and data.preferences (pairs, DPO loss)"
            )
        for key, value in (("max_length", max_length), ("retain_batch_size", retain_batch_size), ("tr_batch_size", tr_batch_size)):
            if value < 1:
                problems.append(f"data.{key} must be at least 1, got {value}")
        if problems:
            raise ConfigError.from_problems("invalid data config", problems)
        self.tokenizer_path = tokenizer
        self.retain_source = retain
        self.tr_source = tamper_resistance
        self.preference_source = preferences
        self.adversary_sources = dict(adversary or {})
        self.eval_sources = dict(eval_questions or {})
        self.max_length = max_length
        self.retain_batch_size = retain_batch_size
        self.tr_batch_size = tr_batch_size
        self.seed = seed
        self.tokenizer = None
        self.adversary_pools: dict[str, TokenPool] = {}
        self.eval_questions: dict[str, list[dict]] = {}

    def setup(self, stage: str) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        eos = self.tokenizer.eos_token
        pool = lambda source: TokenPool(load_texts(source, eos), self.tokenizer, self.max_length)  # noqa: E731
        self.retain_pool = pool(self.retain_source)
        if self.preference_source is not None:
            self.tr_pool = PreferencePool(load_preferences(self.preference_source), self.tokenizer, self.max_length)
        else:
            self.tr_pool = pool(self.tr_source)
        self.adversary_pools = {name: pool(source) for name, source in self.adversary_sources.items()}
        self.eval_questions = {name: load_questions(source) for name, source in self.eval_sources.items()}

    def train_dataloader(self) -> DataLoader:
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        done = self.trainer.global_step if self.trainer is not None else 0
        length = max_steps - done if max_steps and max_steps > 0 else 1000
        # A run resumed at step n draws from a stream seeded by n, so it does not replay the
        # batches it has already trained on.
        seed = self.seed * 1_000_003 + done
        batches = _OuterBatches(self.retain_pool, self.tr_pool, self.retain_batch_size, self.tr_batch_size, seed, max(length, 1))
        return DataLoader(batches, batch_size=None)
