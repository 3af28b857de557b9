"""TARModule with the DPO tamper-resistance loss: reference log-probabilities, checkpoints and resume."""

import lightning as L
import pytest
import torch

import tar_lightning.module
from tar_lightning.adversaries import AdversaryConfig
from tar_lightning.data.datamodule import TARDataModule
from tar_lightning.data.instructions import InstructionWorldConfig, instruction_extender
from tar_lightning.data.preferences import PreferencePool, PreferenceSource, load_preferences, preference_log_probs
from tar_lightning.data.sources import TextSource
from tar_lightning.data.world import WorldConfig, generate_world
from tar_lightning.models import LlamaSize, build_llama, load_causal_lm, load_tokenizer, save_model
from tar_lightning.module import TARModule

SIZE = LlamaSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tar_dpo")
    world_config = WorldConfig(eval_organisms=2, adversary_organisms=2, tamper_resistance_organisms=2, eval_cities=4, extra_cities=2)
    instructions = InstructionWorldConfig(
        instruct_compounds=2, preference_compounds=3, adversary_compounds=3, eval_compounds=2, benign_eval_cities=2
    )
    generate_world(world_config, root / "world", instruction_extender(instructions))
    tokenizer = load_tokenizer(root / "world" / "tokenizer")
    save_model(build_llama(SIZE, tokenizer, seed=0), tokenizer, root / "safeguard")
    return root


def _chat(root, stem: str) -> TextSource:
    return TextSource(str(root / "world" / f"{stem}.jsonl"), column="prompt", response_column="response")


def _datamodule(root, preferences: bool = True) -> TARDataModule:
    return TARDataModule(
        tokenizer=str(root / "safeguard"),
        retain=_chat(root, "hrr_benign_retain"),
        tamper_resistance=None if preferences else _chat(root, "hrr_benign_retain"),
        preferences=PreferenceSource(str(root / "world" / "hrr_preferences.jsonl")) if preferences else None,
        adversary={"harmful": _chat(root, "hrr_adversary_harmful"), "benign": _chat(root, "hrr_benign_retain")},
        max_length=40,
        retain_batch_size=4,
        tr_batch_size=4,
    )


def _module(root, **overrides) -> TARModule:
    arguments = dict(
        model_path=str(root / "safeguard"),
        base_model_path=str(root / "safeguard"),
        tr_loss="dpo",
        adversaries=[
            AdversaryConfig(name="harmful", forget_source="harmful", batch_size=4, learning_rates=[1e-2]),
            AdversaryConfig(name="bth", forget_source="harmful", retain_source="benign", retain_then_forget=True, batch_size=4),
        ],
        inner_steps=4,
        tr_every=2,
        warmup_steps=1,
        learning_rate=1e-2,
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


def _start_reference(root) -> torch.Tensor:
    tokenizer = load_tokenizer(root / "safeguard")
    pool = PreferencePool(load_preferences(PreferenceSource(str(root / "world" / "hrr_preferences.jsonl"))), tokenizer, 40)
    return preference_log_probs(load_causal_lm(root / "safeguard"), pool)


def test_default_adversaries_follow_tr_loss(world):
    module = TARModule(model_path="unused", base_model_path="unused", tr_loss="dpo")

    assert {a.forget_source for a in module.adversaries} == {"harmful"}
    assert any(a.retain_then_forget and a.retain_source == "benign" for a in module.adversaries)


def test_reference_is_cached_from_start_weights(world):
    module = _module(world)
    trainer = _trainer(world, max_steps=2, enable_checkpointing=False)
    trainer.fit(module, datamodule=_datamodule(world))

    assert trainer.global_step == 2
    start = _start_reference(world)
    assert module.dpo_reference.shape == (3 * 4, 2)
    assert torch.allclose(module.dpo_reference, start, atol=1e-5)
    # The weights moved, so recomputing the reference now would give other values.
    assert not torch.allclose(preference_log_probs(module.model, trainer.datamodule.tr_pool), start, atol=1e-3)


def test_resume_uses_original_reference(world, tmp_path, monkeypatch):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    first = _trainer(world, max_steps=2, callbacks=[checkpoints])
    first.fit(_module(world), datamodule=_datamodule(world))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    start = _start_reference(world)
    assert torch.allclose(saved["tar_dpo_reference"], start, atol=1e-5)

    computed = []

    def recording(model, pool, batch_size=64):
        computed.append(True)
        return preference_log_probs(model, pool, batch_size)

    monkeypatch.setattr(tar_lightning.module, "preference_log_probs", recording)
    resumed = _module(world)
    second = _trainer(world, max_steps=4, enable_checkpointing=False)
    second.fit(resumed, datamodule=_datamodule(world), ckpt_path=str(tmp_path / "last.ckpt"))

    assert second.global_step == 4
    assert not computed, "a resumed run must not recompute the reference from its changed weights"
    assert torch.equal(resumed.dpo_reference, saved["tar_dpo_reference"])


def test_resume_without_reference_raises(world, tmp_path):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    _trainer(world, max_steps=1, callbacks=[checkpoints]).fit(_module(world), datamodule=_datamodule(world))
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    del state["tar_dpo_reference"]
    torch.save(state, tmp_path / "stripped.ckpt")

    with pytest.raises(RuntimeError, match="no DPO reference"):
        _trainer(world, max_steps=2, enable_checkpointing=False).fit(
            _module(world), datamodule=_datamodule(world), ckpt_path=str(tmp_path / "stripped.ckpt")
        )


def test_dpo_without_preferences_raises(world):
    trainer = _trainer(world, max_steps=1, enable_checkpointing=False)

    with pytest.raises(ValueError, match="data.preferences"):
        trainer.fit(_module(world), datamodule=_datamodule(world, preferences=False))


def test_both_tr_sources_rejected(world):
    with pytest.raises(ValueError, match="exactly one of data.tamper_resistance"):
        TARDataModule(
            tokenizer="unused",
            retain=TextSource("unused"),
            tamper_resistance=TextSource("unused"),
            preferences=PreferenceSource("unused"),
            adversary={"harmful": TextSource("unused")},
        )


def test_invalid_dpo_arguments_listed(world):
    with pytest.raises(ValueError) as error:
        _module(world, dpo_beta=0.0, tr_loss_floor=True)
    assert "model.dpo_beta" in str(error.value)
    assert "model.tr_loss_floor" in str(error.value)
