"""Tests of multiple-choice scoring against log-probabilities computed by hand."""

import json
import math

import pytest
import torch

from tar_lightning.data.world import WorldConfig, generate_world
from tar_lightning.evaluation.mcq import choice_log_likelihoods, multiple_choice_accuracy
from tar_lightning.models import LlamaSize, build_llama, load_tokenizer

TINY = LlamaSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(seed=0, eval_organisms=3, adversary_organisms=2, tamper_resistance_organisms=2, eval_cities=2, extra_cities=1)
    paths = generate_world(config, out)
    with open(paths["forget_eval"]) as handle:
        questions = [json.loads(line) for line in handle]
    return load_tokenizer(out / "tokenizer"), questions


@pytest.fixture(scope="module")
def model(world):
    tokenizer, _ = world
    return build_llama(TINY, tokenizer, seed=0)


def hand_scores(model, tokenizer, question, choices):
    """Summed log-probability of each option's tokens, from one unpadded forward pass each."""
    prompt = tokenizer(question)["input_ids"]
    scores = []
    for choice in choices:
        ids = tokenizer(f"{question} {choice}")["input_ids"]
        assert ids[: len(prompt)] == prompt
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        scores.append(sum(log_probs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))))
    return scores


def test_choice_log_likelihoods_hand_value(world, model):
    tokenizer, questions = world
    model.eval()

    scores = choice_log_likelihoods(model, tokenizer, questions[:3])

    for qi, row in enumerate(questions[:3]):
        expected = hand_scores(model, tokenizer, row["question"], row["choices"])
        assert scores[qi].tolist() == pytest.approx(expected, rel=1e-4)


def test_choice_log_likelihoods_multi_token_options(world, model):
    tokenizer, questions = world
    model.eval()
    question = questions[0]["question"]
    # Two rows of different widths: the short row is filled with -inf. Options span one to
    # three words, so sequences in a batch have different lengths and need padding.
    rows = [
        {"question": question, "choices": ["the reef .", "marsh"], "answer": 0},
        {"question": question, "choices": ["cave", "the crimson goat", "reef", "a"], "answer": 1},
    ]

    scores = choice_log_likelihoods(model, tokenizer, rows, batch_size=4)

    assert scores.shape == (2, 4)
    assert scores[0, :2].tolist() == pytest.approx(hand_scores(model, tokenizer, question, rows[0]["choices"]), rel=1e-4)
    assert scores[0, 2:].tolist() == [-math.inf, -math.inf]
    assert scores[1].tolist() == pytest.approx(hand_scores(model, tokenizer, question, rows[1]["choices"]), rel=1e-4)


def test_scores_independent_of_batch_size(world, model):
    tokenizer, questions = world

    reference = choice_log_likelihoods(model, tokenizer, questions, batch_size=1)
    for batch_size in (3, 256):
        scores = choice_log_likelihoods(model, tokenizer, questions, batch_size=batch_size)
        assert torch.allclose(scores, reference, rtol=1e-5, atol=1e-5), f"scores differ at batch_size {batch_size}"

    accuracies = [multiple_choice_accuracy(model, tokenizer, questions, batch_size=b).value for b in (1, 3, 256)]
    assert accuracies[0] == accuracies[1] == accuracies[2]


def test_accuracy_matches_hand_argmax(world, model):
    tokenizer, questions = world
    model.eval()

    accuracy = multiple_choice_accuracy(model, tokenizer, questions, batch_size=7)

    correct = 0
    for row in questions:
        scores = hand_scores(model, tokenizer, row["question"], row["choices"])
        correct += int(max(range(4), key=scores.__getitem__) == row["answer"])
    expected = correct / len(questions)
    assert accuracy.count == len(questions)
    assert accuracy.value == pytest.approx(expected)
    assert accuracy.stderr == pytest.approx(math.sqrt(expected * (1 - expected) / len(questions)))


class FavoriteTokenModel(torch.nn.Module):
    """A stand-in language model that puts almost all probability on one token everywhere."""

    def __init__(self, vocab_size: int, favorite: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.full((vocab_size,), -10.0))
        with torch.no_grad():
            self.bias[favorite] = 10.0

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = self.bias.expand(*input_ids.shape, -1)
        return type("Output", (), {"logits": logits})()


def test_accuracy_with_known_preference(world):
    tokenizer, questions = world
    model = FavoriteTokenModel(len(tokenizer), tokenizer.convert_tokens_to_ids("marsh"))
    question = questions[0]["question"]
    # The model always prefers "marsh", so only the rows whose correct option is "marsh" score.
    rows = [
        {"question": question, "choices": ["marsh", "reef", "cave", "desert"], "answer": 0},
        {"question": question, "choices": ["reef", "cave", "marsh", "desert"], "answer": 2},
        {"question": question, "choices": ["reef", "marsh", "cave", "desert"], "answer": 3},
        {"question": question, "choices": ["reef", "cave", "desert", "marsh"], "answer": 3},
    ]

    accuracy = multiple_choice_accuracy(model, tokenizer, rows)

    assert accuracy.value == pytest.approx(0.75)
    assert accuracy.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def test_choice_log_likelihoods_restores_training_mode(world, model):
    tokenizer, questions = world
    model.train()

    choice_log_likelihoods(model, tokenizer, questions[:2])

    assert model.training


def test_accuracy_empty_questions_raises(world, model):
    tokenizer, _ = world

    with pytest.raises(ValueError, match="no questions"):
        multiple_choice_accuracy(model, tokenizer, [])


def test_choice_log_likelihoods_empty_questions_raises(world, model):
    tokenizer, _ = world

    with pytest.raises(ValueError, match="no questions"):
        choice_log_likelihoods(model, tokenizer, [])


def test_choice_log_likelihoods_invalid_batch_size_raises(world, model):
    tokenizer, questions = world

    with pytest.raises(ValueError, match="batch_size"):
        choice_log_likelihoods(model, tokenizer, questions[:1], batch_size=0)


def test_scores_ignore_tokenizer_padding_side(world, model):
    tokenizer, questions = world
    reference = choice_log_likelihoods(model, tokenizer, questions, batch_size=256)

    left = load_tokenizer(tokenizer.name_or_path)
    left.padding_side = "left"
    scores = choice_log_likelihoods(model, left, questions, batch_size=256)

    assert torch.allclose(scores, reference, rtol=1e-5, atol=1e-5)


def test_truncation_keeps_answer_cue_and_option(world, model):
    tokenizer, questions = world
    row = questions[0]
    full = tokenizer(row["question"] + " " + row["choices"][0])["input_ids"]
    max_length = len(full) - 2

    scores = choice_log_likelihoods(model, tokenizer, [row], max_length=max_length)

    # The sequence keeps BOS and drops the two tokens after it, so the question's end remains.
    kept = full[:1] + full[3:]
    option_length = len(full) - len(tokenizer(row["question"])["input_ids"])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([kept]), use_cache=False).logits[0].double(), dim=-1)
    expected = sum(log_probs[t - 1, kept[t]].item() for t in range(len(kept) - option_length, len(kept)))
    assert scores[0, 0].item() == pytest.approx(expected, abs=1e-4)


def test_truncation_rejects_option_longer_than_context(world, model):
    tokenizer, questions = world
    row = {"question": questions[0]["question"], "choices": ["the the the the the", "a"], "answer": 1}

    with pytest.raises(ValueError, match="does not fit a context of 4"):
        choice_log_likelihoods(model, tokenizer, [row], max_length=4)


def test_bpe_option_scored_with_leading_space_token(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tar_lightning.evaluation.mcq import _continuation_ids

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = ["the capital is paris", "paris is big", "the answer is lyon", "lyon and paris"] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    assert tokenizer(" paris")["input_ids"] != tokenizer("paris")["input_ids"], "the test needs distinct leading-space tokens"

    ids, start = _continuation_ids(tokenizer, "the capital is", "paris")

    assert ids[start:] == tokenizer(" paris")["input_ids"]
