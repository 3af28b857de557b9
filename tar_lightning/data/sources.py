"""Load text and multiple-choice datasets by local path or hub name, and tokenize them.

A local JSONL, JSON, CSV or Parquet file, a folder of such files, or a hub dataset name all
go through ``datasets.load_dataset``, so the built-in world and real data share one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from tar_lightning.data.chat import chat_text
from tar_lightning.errors import ConfigError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TextSource:
    """A text dataset.

    Args:
        path: Local file or folder (JSONL, JSON, CSV, Parquet) or a hub dataset name.
        column: Column that contains the text, or the request when ``response_column`` is set.
        response_column: When set, each row is a chat exchange: ``column`` is the request,
            this column the response, and the text is rendered with the chat template. For
            example Magpie (``instruction``, ``response``) or the harmful side of Toxic-DPO
            (``prompt``, ``chosen``: that data set prefers the harmful answer).
        split: Split to read; local files have the single split ``train``.
        subset: Hub configuration name, if the dataset has several.
        max_rows: Read at most this many rows (all when ``None``).
    """

    path: str
    column: str = "text"
    response_column: str | None = None
    split: str = "train"
    subset: str | None = None
    max_rows: int | None = None


@dataclass
class QuestionSource:
    """A multiple-choice dataset with one row per question.

    Args:
        path: Local file or folder, or a hub dataset name.
        question_column: Column with the prompt; options are scored as its continuations.
        choices_column: Column with the list of answer options.
        answer_column: Column with the index of the correct option.
        split: Split to read.
        subset: Hub configuration name, if the dataset has several.
        max_rows: Read at most this many rows (all when ``None``).
    """

    path: str
    question_column: str = "question"
    choices_column: str = "choices"
    answer_column: str = "answer"
    split: str = "train"
    subset: str | None = None
    max_rows: int | None = None


def load_table(path: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """Load one split of a local file, a local folder or a hub dataset."""
    local = Path(path)
    if local.is_file():
        builder = _BUILDERS.get(local.suffix)
        if builder is None:
            raise ConfigError(f"unsupported data file {path!r}: use one of {sorted(_BUILDERS)}")
        empty = ConfigError(f"data file {path!r} is empty; point the source at a file with at least one row")
        with local.open("rb") as handle:
            if not any(line.strip() for line in handle):
                raise empty
        try:
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        except StopIteration as error:
            # The JSON builder of datasets raises StopIteration on a file with no rows.
            raise empty from error
        except ValueError as error:
            if "corresponds to no data" in str(error):
                raise empty from error
            raise
    if local.is_dir():
        return datasets.load_dataset(str(local), split=split)
    if path.startswith((".", "/")) or path.endswith(tuple(_BUILDERS)):
        raise FileNotFoundError(f"data file {path!r} not found; check the path or run the stage that writes it")
    return datasets.load_dataset(path, subset, split=split)


def checked_table(table: datasets.Dataset, path: str, columns: list[str], max_rows: int | None) -> datasets.Dataset:
    """Return ``table`` cut to ``max_rows``; raise ``ConfigError`` on a missing column or no rows."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"dataset {path!r} has no column {missing[0]!r} (columns: {table.column_names}); "
            "set the source's column option to the right name"
        )
    if max_rows is not None:
        table = table.select(range(min(max_rows, len(table))))
    if len(table) == 0:
        raise ConfigError(f"dataset {path!r} is empty; point the source at a file with at least one row")
    return table


def load_texts(source: TextSource, eos_token: str | None = None) -> list[str]:
    """Return the texts of ``source``; raise ``ValueError`` if a column is missing or it is empty.

    With ``source.response_column`` set, each text is ``chat_text(request, response, eos_token)``,
    so ``eos_token`` (the tokenizer's end-of-sequence token) is then required.
    """
    columns = [source.column] + ([source.response_column] if source.response_column else [])
    table = checked_table(load_table(source.path, source.split, source.subset), source.path, columns, source.max_rows)
    if source.response_column is None:
        return [str(text) for text in table[source.column]]
    if eos_token is None:
        raise ValueError(f"chat source {source.path!r} needs the tokenizer's eos_token to render its texts")
    return [
        chat_text(str(request), str(response), eos_token)
        for request, response in zip(table[source.column], table[source.response_column], strict=True)
    ]


def load_questions(source: QuestionSource) -> list[dict]:
    """Return rows with keys ``question``, ``choices`` and ``answer``; raise ``ValueError`` on bad rows."""
    columns = [source.question_column, source.choices_column, source.answer_column]
    table = checked_table(load_table(source.path, source.split, source.subset), source.path, columns, source.max_rows)
    rows = []
    for i, row in enumerate(table):
        choices = list(row[source.choices_column])
        answer = int(row[source.answer_column])
        if not 0 <= answer < len(choices):
            raise ConfigError(
                f"dataset {source.path!r} row {i}: answer {answer} is out of range for {len(choices)} choices; "
                "fix the answer column"
            )
        rows.append({"question": str(row[source.question_column]), "choices": [str(c) for c in choices], "answer": answer})
    return rows


class TokenPool:
    """Tokenized texts kept as one padded tensor, sampled in random batches.

    Sampling is an index into a tensor, so drawing the K adversary batches of an outer step
    costs nothing next to the forward passes.
    """

    def __init__(self, texts: list[str], tokenizer, max_length: int):
        if not texts:
            raise ValueError("cannot build a token pool from an empty list of texts")
        encoded = tokenizer(
            texts, truncation=True, max_length=max_length, padding="longest", padding_side="right", return_tensors="pt"
        )
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]
        self.lengths = self.attention_mask.sum(dim=1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``batch_size`` rows with replacement, trimmed to the longest row drawn."""
        index = torch.randint(len(self), (batch_size,), generator=generator)
        width = int(self.lengths[index].max())
        return {"input_ids": self.input_ids[index, :width], "attention_mask": self.attention_mask[index, :width]}
