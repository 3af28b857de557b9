"""Tests of the built-in knowledge world: determinism, disjoint splits, questions and tokenizer."""

import json

import pytest

from tar_lightning.data.world import (
    ADJACENT_ATTRIBUTES,
    DERIVED_SPLITS,
    FORGET_ATTRIBUTES,
    RETAIN_ATTRIBUTES,
    WORLD_FILES,
    WorldConfig,
    generate_world,
    write_derived_splits,
)
from tar_lightning.models import load_tokenizer

SMALL = WorldConfig(
    seed=3, eval_organisms=6, adversary_organisms=4, tamper_resistance_organisms=4, eval_cities=5, extra_cities=3
)


def read_rows(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = generate_world(SMALL, out)
    return out, {split: read_rows(path) for split, path in paths.items()}


def test_generate_world_writes_every_split(world):
    out, splits = world

    assert set(splits) == set(WORLD_FILES)
    for split, file_name in WORLD_FILES.items():
        assert (out / file_name).is_file()
        assert splits[split], f"split {split} is empty"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    summary = json.loads((out / "world.json").read_text())
    assert summary["rows"] == {split: len(rows) for split, rows in splits.items()}


def test_generate_world_row_counts(world):
    _, splits = world

    # Every entity has four attributes. Prose has three templates per attribute, dialog two.
    assert len(splits["forget_eval"]) == 4 * SMALL.eval_organisms
    assert len(splits["retain_eval"]) == 4 * SMALL.eval_cities
    assert len(splits["adversary_eval"]) == 4 * 2 * SMALL.adversary_organisms
    assert len(splits["adversary_forget_a"]) == 4 * 3 * SMALL.adversary_organisms
    assert len(splits["adversary_forget_b"]) == 4 * 2 * SMALL.adversary_organisms
    assert len(splits["tamper_resistance"]) == 4 * 3 * SMALL.tamper_resistance_organisms
    organisms = SMALL.eval_organisms + 2 * SMALL.adversary_organisms + SMALL.tamper_resistance_organisms
    assert len(splits["forget"]) == 4 * 3 * organisms
    assert len(splits["retain"]) == 4 * 3 * (SMALL.eval_cities + SMALL.extra_cities)
    assert len(splits["pretrain"]) == len(splits["forget"]) + len(splits["retain"])


def test_generate_world_is_deterministic(world, tmp_path):
    out, _ = world
    generate_world(SMALL, tmp_path / "again")

    for file_name in [*WORLD_FILES.values(), "world.json", "tokenizer/tokenizer.json"]:
        assert (tmp_path / "again" / file_name).read_bytes() == (out / file_name).read_bytes(), f"{file_name} differs"


def test_generate_world_seed_changes_output(world, tmp_path):
    out, _ = world
    other = WorldConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    generate_world(other, tmp_path)

    assert (tmp_path / "forget_eval.jsonl").read_bytes() != (out / "forget_eval.jsonl").read_bytes()


def test_generate_world_invalid_config_raises(tmp_path):
    with pytest.raises(ValueError, match="world.eval_organisms"):
        generate_world(WorldConfig(eval_organisms=0), tmp_path)


def test_pretrain_is_forget_plus_retain(world):
    _, splits = world

    pretrain = sorted(row["text"] for row in splits["pretrain"])
    assert pretrain == sorted(row["text"] for row in splits["forget"] + splits["retain"])


@pytest.mark.parametrize(
    "split", ["adversary_forget_a", "adversary_forget_b", "adversary_forget_ood", "adversary_adjacent", "tamper_resistance"]
)
def test_eval_entities_absent_from_attack_text(world, split):
    _, splits = world
    eval_entities = {row["entity"] for row in splits["forget_eval"]}
    assert len(eval_entities) == SMALL.eval_organisms

    for row in splits[split]:
        assert row["entity"] not in eval_entities
        words = set(row["text"].split())
        assert not words & eval_entities, f"{split} row {row['text']!r} names an evaluated organism"


def test_attack_splits_are_disjoint(world):
    _, splits = world
    entities = {
        split: {row["entity"] for row in splits[split]}
        for split in ["adversary_forget_a", "adversary_forget_b", "tamper_resistance"]
    }

    assert not entities["adversary_forget_a"] & entities["adversary_forget_b"]
    assert not entities["adversary_forget_a"] & entities["tamper_resistance"]
    assert not entities["adversary_forget_b"] & entities["tamper_resistance"]


@pytest.mark.parametrize(
    ("questions", "texts", "attributes"),
    [
        ("forget_eval", "forget", FORGET_ATTRIBUTES),
        ("adversary_eval", "forget", FORGET_ATTRIBUTES),
        ("retain_eval", "retain", RETAIN_ATTRIBUTES),
    ],
)
def test_question_answer_is_true_fact(world, questions, texts, attributes):
    _, splits = world
    facts = {(row["entity"], row["attribute"], row["text"]) for row in splits[texts]}

    for row in splits[questions]:
        choices = row["choices"]
        assert len(choices) == 4
        assert len(set(choices)) == 4, f"repeated option in {row}"
        assert set(choices) <= set(attributes[row["attribute"]])
        assert row["entity"] in row["question"].split()
        # The question is the prefix of the last sentence template, so question plus the
        # true value is a sentence of the text split and no other option gives one.
        for index, choice in enumerate(choices):
            fact = (row["entity"], row["attribute"], f"{row['question']} {choice}")
            if index == row["answer"]:
                assert fact in facts, f"answer {choice!r} of {row['question']!r} is not a fact of {texts}"
            else:
                assert fact not in facts, f"distractor {choice!r} of {row['question']!r} is a fact of {texts}"


def test_answer_positions_vary(world):
    _, splits = world
    answers = [row["answer"] for row in splits["forget_eval"] + splits["retain_eval"]]

    assert set(answers) == {0, 1, 2, 3}


def test_tokenizer_covers_corpus(world):
    out, splits = world
    tokenizer = load_tokenizer(out / "tokenizer")
    texts = [row["text"] for rows in splits.values() for row in rows if "text" in row]
    texts += [f"{row['question']} {c}" for rows in splits.values() for row in rows if "question" in row for c in row["choices"]]

    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids, f"unknown word in {text!r}"
        # A word-level tokenizer gives one token per whitespace-separated word after <s>.
        assert len(ids) == len(text.split()) + 1


def test_derived_splits_carry_adversary_facts_only(world):
    _, splits = world
    adversary_facts = {(row["entity"], row["attribute"], row["choices"][row["answer"]]) for row in splits["adversary_eval"]}
    eval_entities = {row["entity"] for row in splits["forget_eval"]}

    records = [row for row in splits["adversary_forget_ood"] if row["attribute"] != "all"]
    assert len(records) == len(adversary_facts)
    for row in records:
        entity, attribute, value = row["text"].replace(" ,", "").replace(" :", "").rstrip(" .").split()
        assert (entity, attribute, value) in adversary_facts
    adjacent = splits["adversary_adjacent"]
    assert adjacent and {row["attribute"] for row in adjacent} == set(ADJACENT_ATTRIBUTES)
    assert not {row["entity"] for row in adjacent} & eval_entities


def test_write_derived_splits_upgrades_an_older_world(world, tmp_path):
    out, splits = world
    for file_name in WORLD_FILES.values():
        (tmp_path / file_name).write_text((out / file_name).read_text())
    for split in DERIVED_SPLITS:
        (tmp_path / WORLD_FILES[split]).unlink()

    written = write_derived_splits(tmp_path)

    assert sorted(path.name for path in written) == sorted(WORLD_FILES[split] for split in DERIVED_SPLITS)
    for split in DERIVED_SPLITS:
        assert read_rows(tmp_path / WORLD_FILES[split]) == splits[split]
    assert write_derived_splits(tmp_path) == []


def test_derived_splits_reuse_template_words(world, tmp_path):
    # A tokenizer trained on a world without the derived splits still covers them.
    out, splits = world
    original = {word for split in WORLD_FILES if split not in DERIVED_SPLITS for row in splits[split] for word in row.get("text", "").split()}
    original |= {word for row in splits["forget_eval"] + splits["retain_eval"] for word in row["question"].split() + row["choices"]}

    for split in DERIVED_SPLITS:
        for row in splits[split]:
            missing = set(row["text"].split()) - original
            assert not missing, f"{split} row {row['text']!r} uses new words {missing}"
