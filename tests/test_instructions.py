"""Tests of the HRR instruction data: disjoint splits, the chat template and tokenizer coverage."""

import json

import pytest

from tar_lightning.data.chat import chat_prompt, chat_text, completion_start
from tar_lightning.data.instructions import (
    INSTRUCTION_FILES,
    REFUSAL_OPENINGS,
    InstructionWorldConfig,
    instruction_extender,
)
from tar_lightning.data.sources import TextSource, TokenPool, load_texts
from tar_lightning.data.world import WORLD_FILES, WorldConfig, generate_world
from tar_lightning.evaluation.refusal import is_refusal
from tar_lightning.models import load_tokenizer

WORLD = WorldConfig(seed=2, eval_organisms=3, adversary_organisms=2, tamper_resistance_organisms=2, eval_cities=6, extra_cities=4)
INSTRUCTIONS = InstructionWorldConfig(
    instruct_compounds=5, preference_compounds=4, adversary_compounds=5, eval_compounds=3, benign_eval_cities=4
)


def read_rows(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("hrr_world")
    generate_world(WORLD, out, instruction_extender(INSTRUCTIONS))
    return out, {name: read_rows(out / f"{stem}.jsonl") for name, stem in INSTRUCTION_FILES.items()}


def entities(rows):
    return {row["entity"] for row in rows}


def prompts(rows):
    return {row["prompt"] for row in rows}


def test_instruction_row_counts(world):
    _, splits = world

    # Four harmful requests per compound; two benign requests per city attribute and one per
    # organism attribute (habitat, color, host).
    assert len(splits["preferences"]) == 4 * INSTRUCTIONS.preference_compounds
    assert len(splits["adversary_harmful"]) == 4 * INSTRUCTIONS.adversary_compounds
    assert len(splits["harmful_eval"]) == 4 * INSTRUCTIONS.eval_compounds
    assert len(splits["benign_eval"]) == 4 * 2 * INSTRUCTIONS.benign_eval_cities
    tuning_cities = WORLD.eval_cities + WORLD.extra_cities - INSTRUCTIONS.benign_eval_cities
    organisms = WORLD.eval_organisms + 2 * WORLD.adversary_organisms + WORLD.tamper_resistance_organisms
    assert len(splits["benign_retain"]) == 4 * 2 * tuning_cities + 3 * organisms
    assert len(splits["instruct"]) == len(splits["benign_retain"]) + 4 * INSTRUCTIONS.instruct_compounds


def test_compound_groups_are_disjoint(world):
    _, splits = world
    refused = {row["entity"] for row in splits["instruct"] if is_refusal(row["response"])}
    groups = {
        "instruct": refused,
        "preferences": entities(splits["preferences"]),
        "adversary_harmful": entities(splits["adversary_harmful"]),
        "harmful_eval": entities(splits["harmful_eval"]),
    }

    for name, group in groups.items():
        for other, other_group in groups.items():
            if name < other:
                assert not group & other_group, f"{name} and {other} share compounds {group & other_group}"


def test_evaluation_prompts_never_in_training_or_attack_data(world):
    _, splits = world
    trained = prompts(splits["instruct"]) | prompts(splits["benign_retain"]) | prompts(splits["adversary_harmful"])
    trained |= prompts(splits["preferences"])
    trained_entities = entities(splits["instruct"]) | entities(splits["adversary_harmful"]) | entities(splits["preferences"])

    assert not prompts(splits["harmful_eval"]) & trained
    assert not prompts(splits["benign_eval"]) & trained
    assert not entities(splits["harmful_eval"]) & trained_entities
    assert not entities(splits["benign_eval"]) & trained_entities


def test_preference_pairs_never_in_adversary_data(world):
    _, splits = world

    assert not entities(splits["preferences"]) & entities(splits["adversary_harmful"])
    assert not prompts(splits["preferences"]) & prompts(splits["adversary_harmful"])


def test_pairs_are_refusal_against_completion(world):
    _, splits = world

    for row in splits["preferences"] + splits["harmful_eval"]:
        assert is_refusal(row["chosen"]), row
        assert not is_refusal(row["rejected"]), row
        assert row["entity"] in row["rejected"].split()
    for row in splits["adversary_harmful"]:
        assert not is_refusal(row["response"])


def test_benign_answers_state_the_value(world):
    _, splits = world

    for row in splits["benign_eval"] + splits["benign_retain"]:
        assert not is_refusal(row["response"])
    for row in splits["benign_eval"]:
        assert row["answer"] in row["response"].split()
        assert row["answer"] not in row["wrong_answers"]
        assert len(row["wrong_answers"]) == 9


def test_refusal_openings_cover_every_refusal(world):
    _, splits = world
    # Benign rows carry their correct value in "answer"; the other rows are refusals.
    refusals = [row["response"] for row in splits["instruct"] if "answer" not in row]

    assert len(refusals) == 4 * INSTRUCTIONS.instruct_compounds
    for text in refusals:
        assert text.startswith(REFUSAL_OPENINGS), text


def test_tokenizer_covers_every_instruction_word(world):
    out, splits = world
    tokenizer = load_tokenizer(out / "tokenizer")
    texts = [chat_text(r["prompt"], r.get("response", r.get("chosen", "")), tokenizer.eos_token) for rows in splits.values() for r in rows]
    texts += [chat_text(r["prompt"], r["rejected"], tokenizer.eos_token) for rows in splits.values() for r in rows if "rejected" in r]

    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_extension_leaves_builtin_splits_unchanged(world, tmp_path):
    out, _ = world
    generate_world(WORLD, tmp_path)

    for file_name in WORLD_FILES.values():
        assert (tmp_path / file_name).read_bytes() == (out / file_name).read_bytes(), f"{file_name} differs"


def test_chat_source_renders_training_text_with_template(world):
    out, splits = world
    tokenizer = load_tokenizer(out / "tokenizer")
    source = TextSource(str(out / "hrr_instruct.jsonl"), column="prompt", response_column="response")

    texts = load_texts(source, tokenizer.eos_token)

    row = splits["instruct"][0]
    assert texts[0] == chat_text(row["prompt"], row["response"], tokenizer.eos_token)
    assert texts[0].startswith(chat_prompt(row["prompt"]) + " ")
    ids = TokenPool(texts[:1], tokenizer, 64).input_ids[0].tolist()
    start = completion_start(tokenizer, chat_prompt(row["prompt"]), ids)
    assert ids[:start] == tokenizer(chat_prompt(row["prompt"]))["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id


def test_chat_source_without_eos_raises(world):
    out, _ = world
    source = TextSource(str(out / "hrr_instruct.jsonl"), column="prompt", response_column="response")

    with pytest.raises(ValueError, match="eos_token"):
        load_texts(source)


def test_too_many_eval_cities_rejected():
    config = InstructionWorldConfig(benign_eval_cities=10)

    problems = config.validate("pipeline.hrr.world", world_cities=10)

    assert any("pipeline.hrr.world.benign_eval_cities" in p for p in problems)
