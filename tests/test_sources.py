"""Tests of loading local text and question files, and of sampling padded token batches."""

import json

import pytest
import torch

from tar_lightning.data.sources import QuestionSource, TextSource, TokenPool, load_questions, load_texts
from tar_lightning.data.tokenizer import train_word_tokenizer

TEXTS = ["one two", "one two three", "one two three four", "one two three four five", "five four three two one zero"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_word_tokenizer(TEXTS, tmp_path_factory.mktemp("tokenizer"))


def test_load_texts_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": "alpha beta", "id": 1}, {"text": "gamma", "id": 2}])

    assert load_texts(TextSource(str(path))) == ["alpha beta", "gamma"]


def test_load_texts_other_column_and_max_rows(tmp_path):
    rows = [{"body": f"row {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "texts.jsonl", rows)

    assert load_texts(TextSource(str(path), column="body", max_rows=2)) == ["row 0", "row 1"]
    assert load_texts(TextSource(str(path), column="body", max_rows=50)) == [f"row {i}" for i in range(5)]


def test_load_texts_csv(tmp_path):
    path = tmp_path / "texts.csv"
    path.write_text("text,label\nfirst line,0\nsecond line,1\n")

    assert load_texts(TextSource(str(path))) == ["first line", "second line"]


def test_load_texts_missing_column_raises(tmp_path):
    path = write_jsonl(tmp_path / "texts.jsonl", [{"content": "alpha", "id": 1}])

    with pytest.raises(ValueError, match="no column 'text'") as error:
        load_texts(TextSource(str(path)))
    assert "content" in str(error.value)
    assert "id" in str(error.value)


def test_load_texts_zero_max_rows_raises(tmp_path):
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": "alpha"}])

    with pytest.raises(ValueError, match="is empty"):
        load_texts(TextSource(str(path), max_rows=0))


def test_load_texts_empty_jsonl_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")

    with pytest.raises(ValueError, match="empty"):
        load_texts(TextSource(str(path)))


def test_load_texts_blank_jsonl_raises(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")

    with pytest.raises(ValueError, match="empty"):
        load_texts(TextSource(str(path)))


@pytest.mark.parametrize("name", ["./missing.jsonl", "missing.jsonl", "./data/missing.csv"])
def test_load_texts_missing_file_raises(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(FileNotFoundError, match="missing"):
        load_texts(TextSource(name))


def test_load_texts_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("alpha\n")

    with pytest.raises(ValueError, match="unsupported data file"):
        load_texts(TextSource(str(path)))


def test_load_questions_renamed_columns(tmp_path):
    rows = [
        {"prompt": "the sky is", "options": ["blue", "green"], "label": 0},
        {"prompt": "grass is", "options": ["blue", "green", "red"], "label": 1},
    ]
    path = write_jsonl(tmp_path / "questions.jsonl", rows)
    source = QuestionSource(str(path), question_column="prompt", choices_column="options", answer_column="label")

    assert load_questions(source) == [
        {"question": "the sky is", "choices": ["blue", "green"], "answer": 0},
        {"question": "grass is", "choices": ["blue", "green", "red"], "answer": 1},
    ]


def test_load_questions_answer_out_of_range_raises(tmp_path):
    rows = [
        {"question": "a", "choices": ["x", "y"], "answer": 1},
        {"question": "b", "choices": ["x", "y"], "answer": 2},
    ]
    path = write_jsonl(tmp_path / "questions.jsonl", rows)

    with pytest.raises(ValueError, match="row 1: answer 2"):
        load_questions(QuestionSource(str(path)))


def real_tokens(batch, row):
    mask = batch["attention_mask"][row]
    return batch["input_ids"][row][mask.bool()].tolist()


def test_token_pool_sample_trims_and_pads_right(tokenizer):
    pool = TokenPool(TEXTS, tokenizer, max_length=32)
    encodings = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert pool.input_ids.shape == (len(TEXTS), 7)

    widths = set()
    for seed in range(20):
        batch = pool.sample(3, torch.Generator().manual_seed(seed))
        rows = [real_tokens(batch, row) for row in range(3)]
        for row, tokens in enumerate(rows):
            assert tokens in encodings, f"sampled row {tokens} is not a tokenized text"
            mask = batch["attention_mask"][row]
            length = len(tokens)
            # Right padding: real tokens first, then padding tokens to the batch width.
            assert mask[:length].tolist() == [1] * length
            assert mask[length:].tolist() == [0] * (mask.numel() - length)
            assert batch["input_ids"][row, length:].tolist() == [tokenizer.pad_token_id] * (mask.numel() - length)
        width = batch["input_ids"].shape[1]
        assert width == max(len(tokens) for tokens in rows), "batch is not trimmed to its longest row"
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        widths.add(width)

    assert min(widths) < 7, "no sample was narrower than the pool"


def test_token_pool_truncates(tokenizer):
    pool = TokenPool(TEXTS, tokenizer, max_length=4)

    assert pool.input_ids.shape == (len(TEXTS), 4)
    assert pool.lengths.tolist() == [3, 4, 4, 4, 4]
    assert (pool.input_ids[:, 0] == tokenizer.bos_token_id).all()


def test_token_pool_sample_same_seed_same_batch(tokenizer):
    pool = TokenPool(TEXTS, tokenizer, max_length=32)

    first = pool.sample(4, torch.Generator().manual_seed(5))
    second = pool.sample(4, torch.Generator().manual_seed(5))

    assert torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["attention_mask"], second["attention_mask"])


def test_token_pool_empty_raises(tokenizer):
    with pytest.raises(ValueError, match="empty list of texts"):
        TokenPool([], tokenizer, max_length=8)
