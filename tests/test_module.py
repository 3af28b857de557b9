"""TARModule on a tiny Trainer: outer steps, logged keys, checkpoints and resume."""

import csv

import lightning as L
import pytest
import torch

from lightning.pytorch.loggers import CSVLogger

from tar_lightning.adversaries import AdversaryConfig
from tar_lightning.data.datamodule import TARDataModule
from tar_lightning.data.sources import QuestionSource, TextSource
from tar_lightning.data.world import WORLD_FILES, WorldConfig, generate_world
from tar_lightning.models import LlamaSize, build_llama, load_causal_lm, load_tokenizer, save_model
from tar_lightning.inner_loop import InnerLoopResult
from tar_lightning.module import TARModule

SIZE = LlamaSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tar")
    generate_world(WorldConfig(eval_organisms=3, adversary_organisms=3, tamper_resistance_organisms=3, eval_cities=3, extra_cities=1), root / "world")
    tokenizer = load_tokenizer(root / "world" / "tokenizer")
    save_model(build_llama(SIZE, tokenizer, seed=0), tokenizer, root / "base")
    save_model(build_llama(SIZE, tokenizer, seed=1), tokenizer, root / "safeguard")
    return root


def _datamodule(root) -> TARDataModule:
    world = root / "world"
    return TARDataModule(
        tokenizer=str(root / "safeguard"),
        retain=TextSource(str(world / WORLD_FILES["retain"])),
        tamper_resistance=TextSource(str(world / WORLD_FILES["tamper_resistance"])),
        adversary={
            "forget_a": TextSource(str(world / WORLD_FILES["adversary_forget_a"])),
            "retain": TextSource(str(world / WORLD_FILES["adversary_retain"])),
        },
        eval_questions={"forget": QuestionSource(str(world / WORLD_FILES["forget_eval"]))},
        max_length=24,
        retain_batch_size=4,
        tr_batch_size=4,
    )


def _module(root, **overrides) -> TARModule:
    arguments = dict(
        model_path=str(root / "safeguard"),
        base_model_path=str(root / "base"),
        adversaries=[
            AdversaryConfig(name="a", forget_source="forget_a", batch_size=4),
            AdversaryConfig(name="rtf", forget_source="forget_a", retain_then_forget=True, batch_size=4),
        ],
        inner_steps=4,
        tr_every=2,
        warmup_steps=1,
        eval_every_n_steps=2,
    )
    arguments.update(overrides)
    return TARModule(**arguments)


def _trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **kwargs,
    )


def _trainer_with_csv(root, log_dir, max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(log_dir), name="csv"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def test_global_step_counts_outer_steps(world, tmp_path):
    trainer = _trainer_with_csv(world, tmp_path, max_steps=4)
    trainer.fit(_module(world), datamodule=_datamodule(world))
    assert trainer.global_step == 4

    with open(trainer.logger.experiment.metrics_file_path) as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    expected = {
        "train/retain_loss",
        "train/tr_loss",
        "inner/adversary_loss_first",
        "inner/adversary_lr",
        "grad/tr_norm",
        "grad/retain_norm",
        "eval/forget_acc",
    }
    assert expected <= columns
    logged_steps = sorted({int(row["step"]) for row in rows if row["train/tr_loss"]})
    assert logged_steps == [0, 1, 2, 3]
    # eval_every_n_steps=2: scored after outer steps 2 and 4 only.
    evaluated_steps = sorted(int(row["step"]) for row in rows if row["eval/forget_acc"])
    assert evaluated_steps == [2, 4]


def test_training_moves_weights_but_not_base(world):
    module = _module(world)
    trainer = _trainer(world, max_steps=2, enable_checkpointing=False)
    trainer.fit(module, datamodule=_datamodule(world))
    start = load_causal_lm(world / "safeguard").state_dict()
    base = load_causal_lm(world / "base").state_dict()
    trained = module.model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert all(torch.equal(module.base_model.state_dict()[k], base[k]) for k in base)


def test_frozen_base_not_in_checkpoint(world):
    module = _module(world)
    trainer = _trainer(world, max_steps=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=_datamodule(world))
    assert all(key.startswith("model.") for key in module.state_dict())


def test_resume_continues_from_checkpoint(world, tmp_path):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    first = _trainer(world, max_steps=2, callbacks=[checkpoints])
    first.fit(_module(world), datamodule=_datamodule(world))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert "tar_sampling" in saved
    # Checkpoints hold the averaged (eval-mode) weights of schedule-free AdamW.
    assert saved["optimizer_states"][0]["param_groups"][0]["train_mode"] is False

    resumed = _module(world)
    second = _trainer(world, max_steps=4, enable_checkpointing=False)
    second.fit(resumed, datamodule=_datamodule(world), ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.global_step == 4


def test_unknown_adversary_source_raises(world):
    module = _module(world, adversaries=[AdversaryConfig(name="x", forget_source="forget_b", batch_size=4)])
    trainer = _trainer(world, max_steps=1, enable_checkpointing=False)
    with pytest.raises(ValueError, match="forget_b"):
        trainer.fit(module, datamodule=_datamodule(world))


def test_invalid_arguments_listed(world):
    with pytest.raises(ValueError) as error:
        _module(world, inner_steps=2, tr_every=3, tr_weight=-1.0)
    assert "model.tr_every" in str(error.value)
    assert "model.tr_weight" in str(error.value)


def test_exact_meta_gradient_trains(world):
    module = _module(world, meta_gradient="exact", meta_truncation=2, meta_grad_clip=10.0, attn_implementation="eager")
    before = {name: p.detach().clone() for name, p in load_causal_lm(world / "safeguard").named_parameters()}

    _trainer(world, max_steps=2).fit(module, datamodule=_datamodule(world))

    assert module.global_step == 2
    assert any(not torch.equal(p, before[name]) for name, p in module.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_exact_meta_gradient_requires_eager_attention(world):
    with pytest.raises(ValueError, match="model.attn_implementation must be eager with meta_gradient exact"):
        _module(world, meta_gradient="exact")


def test_meta_truncation_beyond_inner_steps_rejected(world):
    with pytest.raises(ValueError, match=r"model.meta_truncation must be in \[1, inner_steps=4\]"):
        _module(world, meta_gradient="exact", attn_implementation="eager", meta_truncation=5)


def test_lora_adversary_trains(world):
    lora = AdversaryConfig(name="lora", forget_source="forget_a", batch_size=4, optimizer="adam", lora_rank=2, lora_alpha=4.0)
    module = _module(world, adversaries=[lora])
    before = {name: p.detach().clone() for name, p in load_causal_lm(world / "safeguard").named_parameters()}

    _trainer(world, max_steps=2).fit(module, datamodule=_datamodule(world))

    assert module.global_step == 2
    assert "adam/lora" in module._inner_optimizers
    assert any(not torch.equal(p, before[name]) for name, p in module.model.named_parameters())


def test_attacks_per_step_average_disjoint_parts(world):
    module = _module(world, attacks_per_step=2)
    module._tr_grads = [torch.zeros(3)]
    seen = []

    def fake_attack(adversary, part):
        # The gradient of an attack is the sum of its part's input ids, so the mean is checkable.
        seen.append(part["input_ids"].clone())
        total = float(part["input_ids"].sum())
        return InnerLoopResult([torch.full((3,), total)], [total], [total, total], 1)

    module._tamper_resistance_gradient = fake_attack
    tr_batch = {"input_ids": torch.arange(8).reshape(4, 2), "attention_mask": torch.ones(4, 2)}
    _, result = module._simulated_attacks(tr_batch)

    assert [part.tolist() for part in seen] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert torch.equal(result.tr_grads[0], torch.full((3,), (6.0 + 22.0) / 2))
    assert result.tr_grads is module._tr_grads
    assert result.adversary_losses == [6.0, 22.0]
    assert result.tr_losses == [6.0, 6.0, 22.0, 22.0]
    assert result.tr_used == 2


def test_several_attacks_per_step_train(world, tmp_path):
    trainer = _trainer_with_csv(world, tmp_path, max_steps=2)
    module = _module(world, attacks_per_step=2)
    trainer.fit(module, datamodule=_datamodule(world))

    assert trainer.global_step == 2
    with open(trainer.logger.experiment.metrics_file_path) as handle:
        used = [float(row["train/tr_gradients_used"]) for row in csv.DictReader(handle) if row["train/tr_gradients_used"]]
    # inner_steps 4 with tr_every 2 takes two TR gradients per attack, and two attacks run per step.
    assert used == [4.0, 4.0]


def test_attacks_per_step_beyond_tr_batch_rejected(world):
    module = _module(world, attacks_per_step=8)
    problems = module.validate_arguments(tr_batch_size=4)
    assert any("data.tr_batch_size (4) must be at least model.attacks_per_step (8)" in p for p in problems)
    with pytest.raises(ValueError, match="model.attacks_per_step must be at least 1"):
        _module(world, attacks_per_step=0)


def test_sampled_horizons_train(world, tmp_path):
    trainer = _trainer_with_csv(world, tmp_path, max_steps=6)
    adversary = AdversaryConfig(name="a", forget_source="forget_a", batch_size=4, horizons=[2, 6])
    module = _module(world, adversaries=[adversary])
    trainer.fit(module, datamodule=_datamodule(world))

    with open(trainer.logger.experiment.metrics_file_path) as handle:
        steps = {float(row["inner/steps"]) for row in csv.DictReader(handle) if row["inner/steps"]}
    assert steps == {2.0, 6.0}
    assert sorted(module.tr_weights) == [2, 4, 6]
    assert sorted(module.tr_weights[6]) == [1, 3, 5]


def test_horizon_shorter_than_tr_every_rejected(world):
    adversary = AdversaryConfig(name="a", forget_source="forget_a", horizons=[1, 8])
    with pytest.raises(ValueError, match=r"model.adversaries\[0\].horizons must each be at least model.tr_every=2"):
        _module(world, adversaries=[adversary])
