"""The real command line on the tiny preset: every stage, the report, and stage skipping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "tar_lightning.cli", "fit", "--config", "configs/wkr.yaml", "--config", "configs/tiny.yaml"]
HRR_COMMAND = [sys.executable, "-m", "tar_lightning.cli", "fit", "--config", "configs/hrr.yaml", "--config", "configs/tiny_hrr.yaml"]


def _run(run_dir: Path, *extra: str, command: list[str] = COMMAND) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [*command, "--pipeline.run_dir", str(run_dir), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    first = _run(run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("base", "safeguard", "tar"):
        assert (run_dir / stage / "config.json").is_file()
        assert (run_dir / stage / "model.safetensors").is_file()
    assert (run_dir / "lightning" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run_dir / "report.md").is_file()
    assert (run_dir / "report.png").is_file()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["objective"] == "wkr"
    assert report["chance"] == 0.25
    assert set(report["models"]) == {"base", "safeguard", "tar"}
    for entry in report["models"].values():
        assert 0.0 <= entry["forget_acc"] <= 1.0
        assert set(entry["post_attack"]) == {"adamw_short", "sgd_retain_then_forget"}
        for post in entry["post_attack"].values():
            assert post["seeds"] == 2
            assert len(post["per_seed"]) == 2
            assert {"forget_acc", "forget_acc_se", "retain_acc", "adversary_acc", "final_loss"} <= set(post)

    second = _run(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage, folder in (("world", "world"), ("base model", "base"), ("safeguard", "safeguard")):
        assert f"{stage}: {run_dir / folder} exists, skipping" in second.stderr


# An argument checked on its own, and one checked against the data config.
BAD_OVERRIDES = [
    (["--model.tr_every", "99"], ["error: invalid model config", "model.tr_every"]),
    (["--model.attacks_per_step", "999"], ["error: invalid configuration", "data.tr_batch_size", "model.attacks_per_step (999)"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("override, messages", BAD_OVERRIDES)
def test_bad_override_fails_before_any_stage(tmp_path, override, messages):
    run_dir = tmp_path / "run"
    result = _run(run_dir, *override)
    assert result.returncode == 2
    for message in messages:
        assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "world").exists()


@pytest.mark.slow
def test_tiny_hrr_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    first = _run(run_dir, command=HRR_COMMAND)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("base", "safeguard", "tar"):
        assert (run_dir / stage / "model.safetensors").is_file()
    assert (run_dir / "world" / "hrr_preferences.jsonl").is_file()
    assert "cached DPO reference log-probabilities" in first.stderr
    checkpoint = torch.load(run_dir / "lightning" / "last.ckpt", weights_only=True)
    assert checkpoint["tar_dpo_reference"].shape[1] == 2
    assert (run_dir / "report.md").is_file()
    assert (run_dir / "report.png").is_file()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["objective"] == "hrr"
    assert set(report["models"]) == {"base", "safeguard", "tar"}
    assert report["models"]["base"]["post_attack"] == {}
    for name in ("safeguard", "tar"):
        entry = report["models"][name]
        assert 0.0 <= entry["refusal_rate"] <= 1.0
        assert entry["attack_success"] == pytest.approx(1.0 - entry["refusal_rate"])
        assert {"benign_acc", "preference_win_rate", "benign_refusal_rate"} <= set(entry)
        assert set(entry["post_attack"]) == {"adamw_short", "sgd_short"}
        for post in entry["post_attack"].values():
            assert post["seeds"] == 2
            assert len(post["per_seed"]) == 2
            assert {"refusal_rate", "refusal_rate_se", "attack_success", "benign_acc", "final_loss"} <= set(post)

    second = _run(run_dir, command=HRR_COMMAND)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"refusal training: {run_dir / 'safeguard'} exists, skipping" in second.stderr


@pytest.mark.slow
def test_hrr_objective_with_entropy_loss_fails(tmp_path):
    run_dir = tmp_path / "run"
    result = _run(run_dir, "--model.tr_loss", "entropy", command=HRR_COMMAND)
    assert result.returncode == 2
    assert "model.tr_loss must be one of ['dpo'] with pipeline.objective 'hrr'" in result.stderr
    assert not (run_dir / "world").exists()
