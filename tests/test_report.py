"""Evaluation bookkeeping: the resumable result cache and the written report."""

import json
from dataclasses import replace

from tar_lightning.evaluation.attacks import AttackConfig
from tar_lightning.evaluation.report import ResultCache, render_markdown, run_fingerprint, write_report


def _model_dir(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    return model_dir


def test_cache_returns_matching_result(tmp_path):
    attack = AttackConfig(name="a", learning_rate=1e-3)
    fingerprint = run_fingerprint(str(_model_dir(tmp_path)), attack, "questions")
    cache = ResultCache(tmp_path / "runs.json")
    cache.put("m/a/0", fingerprint, {"forget_acc": 0.5})

    reloaded = ResultCache(tmp_path / "runs.json")
    assert reloaded.get("m/a/0", fingerprint) == {"forget_acc": 0.5}


def test_cache_ignores_changed_attack(tmp_path):
    model_dir = str(_model_dir(tmp_path))
    attack = AttackConfig(name="a", learning_rate=1e-3)
    cache = ResultCache(tmp_path / "runs.json")
    cache.put("m/a/0", run_fingerprint(model_dir, attack, "questions"), {"forget_acc": 0.5})

    changed = replace(attack, learning_rate=2e-3)
    assert cache.get("m/a/0", run_fingerprint(model_dir, changed, "questions")) is None


def test_cache_ignores_rewritten_model(tmp_path):
    model_dir = _model_dir(tmp_path)
    attack = AttackConfig(name="a")
    before = run_fingerprint(str(model_dir), attack, "questions")
    (model_dir / "model.safetensors").write_bytes(b"other weights")
    assert run_fingerprint(str(model_dir), attack, "questions") != before


def _report() -> dict:
    post = {
        "forget_acc": 0.6,
        "forget_acc_se": 0.02,
        "retain_acc": 0.9,
        "retain_acc_se": 0.01,
        "adversary_acc": 0.8,
        "adversary_acc_se": 0.01,
        "final_loss": 0.7,
        "final_loss_se": 0.01,
        "seeds": 3,
    }
    entry = {
        "forget_acc": 0.3,
        "forget_acc_se": 0.023,
        "retain_acc": 0.99,
        "retain_acc_se": 0.005,
        "post_attack": {"a": post},
        "post_attack_forget_mean": 0.6,
        "post_attack_forget_worst": 0.6,
    }
    return {"objective": "wkr", "chance": 0.25, "models": {"safeguard": entry}}


def test_markdown_lists_model_and_attack():
    text = render_markdown(_report(), [AttackConfig(name="a")], ["a note."])
    assert "| safeguard | 0.300 ± 0.023 | 0.990 ± 0.005 | 0.600 ± 0.020 | 0.600 | 0.600 |" in text
    assert "- a note." in text


def test_write_report_creates_three_files(tmp_path):
    write_report(_report(), [AttackConfig(name="a")], tmp_path, [])
    assert json.loads((tmp_path / "report.json").read_text())["models"]["safeguard"]["forget_acc"] == 0.3
    assert (tmp_path / "report.md").read_text().startswith("# Report: wkr")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
