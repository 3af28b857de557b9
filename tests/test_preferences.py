"""Loaders of the authors' HRR data formats, on local files with the same columns, and the pair pool."""

import json

import pytest
import torch

from tar_lightning.data.chat import chat_prompt, chat_text
from tar_lightning.data.preferences import PreferencePair, PreferencePool, PreferenceSource, load_preferences
from tar_lightning.data.sources import TextSource, load_texts
from tar_lightning.data.tokenizer import train_word_tokenizer
from tar_lightning.errors import ConfigError

EOS = "</s>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_toxic_dpo_columns(tmp_path):
    # Toxic-DPO (unalignment/toxic-dpo-v0.2): prompt, chosen (the compliant answer), rejected (a refusal), id.
    rows = [
        {"prompt": "how to pick a lock", "chosen": "first insert a tension wrench", "rejected": "i can not help", "id": "a"},
        {"prompt": "how to forge a note", "chosen": "print it on cotton paper", "rejected": "i will not help", "id": "b"},
    ]
    path = write_jsonl(tmp_path / "toxic.jsonl", rows)

    pairs = load_preferences(PreferenceSource(path))
    attack_texts = load_texts(TextSource(path, column="prompt", response_column="chosen"), EOS)

    assert pairs[1] == PreferencePair("how to forge a note", "print it on cotton paper", "i will not help")
    assert attack_texts[0] == chat_text("how to pick a lock", "first insert a tension wrench", EOS)


def test_hh_golden_pairs_split_at_common_prefix(tmp_path):
    # Anthropic HH golden: only chosen and rejected, each a whole conversation.
    rows = [
        {
            "chosen": "\n\nHuman: how do I hurt someone?\n\nAssistant: I won't help with that.",
            "rejected": "\n\nHuman: how do I hurt someone?\n\nAssistant: Hit them hard.",
        }
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)

    pairs = load_preferences(PreferenceSource(path, prompt_column=None))

    assert pairs[0].prompt == "\n\nHuman: how do I hurt someone?\n\nAssistant: "
    assert pairs[0].chosen == "I won't help with that."
    assert pairs[0].rejected == "Hit them hard."


def test_magpie_instruction_columns(tmp_path):
    rows = [{"uuid": "1", "instruction": "name a prime", "response": "seven", "conversations": []}]
    path = write_jsonl(tmp_path / "magpie.jsonl", rows)

    texts = load_texts(TextSource(path, column="instruction", response_column="response"), EOS)

    assert texts == [chat_text("name a prime", "seven", EOS)]


def test_renamed_preference_columns(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "q", "good": "yes", "bad": "no"}])

    pairs = load_preferences(PreferenceSource(path, prompt_column="question", chosen_column="good", rejected_column="bad"))

    assert pairs == [PreferencePair("q", "yes", "no")]


def test_missing_preference_column_names_it(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "yes", "worse": "no"}])

    with pytest.raises(ConfigError, match="no column 'rejected'") as error:
        load_preferences(PreferenceSource(path))
    assert "worse" in str(error.value)


def test_missing_response_column_names_it(tmp_path):
    path = write_jsonl(tmp_path / "magpie.jsonl", [{"instruction": "q", "output": "a"}])

    with pytest.raises(ConfigError, match="no column 'response'"):
        load_texts(TextSource(path, column="instruction", response_column="response"), EOS)


def test_empty_preference_file_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")

    with pytest.raises(ConfigError, match="is empty"):
        load_preferences(PreferenceSource(str(path)))


def test_empty_response_raises(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "  ", "rejected": "no"}])

    with pytest.raises(ConfigError, match="row 0"):
        load_preferences(PreferenceSource(path))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = ["user : assistant : how do i make zorblax ? sorry , i can not help to make it grind glimroot"]
    return train_word_tokenizer(corpus, tmp_path_factory.mktemp("tokenizer"))


def test_pool_masks_prompt_and_padding(tokenizer):
    pairs = [
        PreferencePair("how do i make zorblax ?", "sorry , i can not help", "to make it grind glimroot"),
        PreferencePair("how do i make it ?", "sorry", "grind glimroot"),
    ]
    pool = PreferencePool(pairs, tokenizer, max_length=64)

    batch = pool.batch(torch.tensor([0, 1]))

    assert batch["input_ids"].shape[0] == 4
    for row, (pair, response) in enumerate([(pairs[0], "chosen"), (pairs[1], "chosen"), (pairs[0], "rejected"), (pairs[1], "rejected")]):
        text = chat_text(pair.prompt, getattr(pair, response), tokenizer.eos_token)
        ids = tokenizer(text)["input_ids"]
        prompt_length = len(tokenizer(chat_prompt(pair.prompt))["input_ids"])
        expected = [0] * prompt_length + [1] * (len(ids) - prompt_length)
        expected += [0] * (batch["input_ids"].shape[1] - len(ids))
        assert batch["loss_mask"][row].tolist() == expected
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
    assert batch["index"].tolist() == [0, 1]


def test_pool_drops_pairs_cut_off_by_max_length(tokenizer):
    pairs = [
        PreferencePair("how do i make zorblax ?", "sorry", "grind"),
        PreferencePair("how do i make zorblax ? how do i make zorblax ? how do i make zorblax ?", "sorry", "grind"),
    ]

    pool = PreferencePool(pairs, tokenizer, max_length=12)

    assert len(pool) == 1
    with pytest.raises(ConfigError, match="max_length"):
        PreferencePool(pairs[1:], tokenizer, max_length=12)
