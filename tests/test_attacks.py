"""Tests of fine-tuning attacks: their data, LoRA, the transformers Trainer loop and config checks."""

import hashlib

import pytest
import torch

from tar_lightning.data.sources import TextSource, TokenPool, load_texts
from tar_lightning.evaluation.attacks import AttackConfig, LoraAttackConfig, attack_batches, concat_batches, run_attack
from tar_lightning.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def pools(tiny_run):
    tokenizer = load_tokenizer(tiny_run / "model_a")
    world = tiny_run / "world"
    files = {"forget_a": "adversary_forget_a.jsonl", "retain": "adversary_retain.jsonl"}
    return {name: TokenPool(load_texts(TextSource(str(world / file))), tokenizer, 32) for name, file in files.items()}


def _rows_from(pool: TokenPool, batch: dict) -> int:
    """Count the batch's rows that are rows of ``pool``."""
    rows = {tuple(ids[mask.bool()].tolist()) for ids, mask in zip(pool.input_ids, pool.attention_mask)}
    return sum(tuple(ids[mask.bool()].tolist()) in rows for ids, mask in zip(batch["input_ids"], batch["attention_mask"]))


def test_concat_batches_pads_the_narrower_batch():
    first = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    second = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.tensor([[1]])}

    out = concat_batches(first, second)

    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_attack_batches_switch_from_retain_to_forget(pools):
    attack = AttackConfig(steps=10, batch_size=4, data="forget_a", retain_fraction=0.4)
    next_batch = attack_batches(attack, pools, torch.Generator().manual_seed(0))

    sources = [("retain" if _rows_from(pools["retain"], next_batch(step)) == 4 else "forget_a") for step in range(10)]

    assert sources == ["retain"] * 4 + ["forget_a"] * 6


def test_attack_batches_mix_benign_share(pools):
    attack = AttackConfig(steps=3, batch_size=8, data="forget_a", benign_data="retain", benign_share=0.25)
    next_batch = attack_batches(attack, pools, torch.Generator().manual_seed(0))

    for step in range(3):
        batch = next_batch(step)
        assert batch["input_ids"].shape[0] == 8
        assert _rows_from(pools["retain"], batch) == 2
        assert _rows_from(pools["forget_a"], batch) == 6


def _digest(directory) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir()) if path.is_file()}


def test_run_attack_leaves_model_unwritten(tiny_run, pools):
    before = _digest(tiny_run / "model_a")
    traced = []

    run = run_attack(
        str(tiny_run / "model_a"),
        AttackConfig(steps=6, batch_size=4, learning_rate=1e-2),
        pools,
        seed=0,
        device=torch.device("cpu"),
        progress=False,
        callback=lambda step, model: traced.append(step),
        callback_steps={2, 4, 8},
    )

    assert _digest(tiny_run / "model_a") == before
    assert traced == [2, 4]
    assert run.steps == len(run.losses) == 6
    saved = load_causal_lm(tiny_run / "model_a")
    changed = [name for name, p in run.model.named_parameters() if not torch.equal(p, saved.get_parameter(name))]
    assert changed, "the attack changed no weight"


def test_run_attack_lora_changes_only_adapted_projections(tiny_run, pools):
    lora = LoraAttackConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"])

    run = run_attack(str(tiny_run / "model_a"), AttackConfig(steps=4, batch_size=4, learning_rate=5e-2, lora=lora), pools, 0, torch.device("cpu"), progress=False)

    # The adapters are merged, so the result is a plain model with the saved parameter names.
    saved = load_causal_lm(tiny_run / "model_a")
    assert type(run.model) is type(saved)
    assert [name for name, _ in run.model.named_parameters()] == [name for name, _ in saved.named_parameters()]
    changed = {name for name, p in run.model.named_parameters() if not torch.allclose(p, saved.get_parameter(name))}
    assert changed
    assert all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), changed


def test_hf_trainer_loop_sees_the_same_batches(tiny_run, pools):
    options = dict(steps=5, batch_size=4, learning_rate=1e-2, optimizer="adamw")

    ours = run_attack(str(tiny_run / "model_a"), AttackConfig(**options), pools, 3, torch.device("cpu"), progress=False)
    traced = []
    trainer = run_attack(
        str(tiny_run / "model_a"),
        AttackConfig(loop="hf_trainer", **options),
        pools,
        3,
        torch.device("cpu"),
        progress=False,
        callback=lambda step, model: traced.append(step),
        callback_steps={3},
    )

    # Same weights, batches and AdamW settings: the two loops take the same steps.
    assert trainer.losses == pytest.approx(ours.losses, rel=1e-3)
    assert trainer.losses[-1] < trainer.losses[0]
    assert traced == [3]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"loop": "hf_trainer", "optimizer": "adadelta"}, "optimizer must be one of"),
        ({"loop": "hf_trainer", "schedule": "sgdr", "warmup_steps": 1, "restart_steps": 2}, "schedule must be one of"),
        ({"loop": "hf_trainer", "retain_fraction": 0.4}, "trains on one corpus"),
        ({"benign_share": 1.0}, "benign_share must be in [0, 1)"),
        ({"lora": LoraAttackConfig(rank=0)}, "lora.rank must be at least 1"),
        ({"benign_share": 0.5, "benign_data": "web"}, "uses data 'web'"),
    ],
)
def test_attack_validate_names_the_problem(changes, expected):
    problems = AttackConfig(**changes).validate("attacks[0]", {"forget_a", "retain"})

    assert len(problems) == 1
    assert problems[0].startswith("attacks[0]")
    assert expected in problems[0]
