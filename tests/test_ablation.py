"""The ablation runner on the tiny preset: cells, seeds, shared stages, resume and the table."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tar_lightning.ablation import _durability, AblationCell, AblationConfig, plot_ablation, render_ablation, run_ablation

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIGS = [str(ROOT / "configs" / "wkr.yaml"), str(ROOT / "configs" / "tiny.yaml")]
TINY_ATTACK = "[{name: sgd_short, optimizer: sgd_momentum, learning_rate: 0.01, steps: 3, batch_size: 4}]"


def test_validate_lists_missing_source_and_files(tmp_path):
    config = AblationConfig(
        cells=[AblationCell("a"), AblationCell("a")],
        seeds=[],
        fit_configs=[str(tmp_path / "nope.yaml")],
        source_run=str(tmp_path / "missing_run"),
    )

    problems = config.validate()

    assert any("names must be unique" in p for p in problems)
    assert any("ablation.seeds must list at least one seed" in p for p in problems)
    assert any("nope.yaml not found" in p for p in problems)
    assert any("missing_run lacks ['world', 'base', 'safeguard']" in p for p in problems)


def test_table_shows_mean_and_standard_error():
    metric = {"mean": 0.5, "se": 0.02}
    summary = {
        "seeds": [0, 1],
        "held_out_only": True,
        "cells": {
            "k8": {
                "args": ["--model.inner_steps", "8"],
                **{key: metric for key in ("forget_before", "forget_after_mean", "forget_after_worst", "retain_after_mean", "adversary_after_mean")},
                **{f"forget_at_step_{step}": {"mean": step / 1000, "se": 0.0} for step in (16, 64, 256)},
                "collapsed_attacks": {"mean": 1.0, "se": 0.0},
                "fit_seconds": {"mean": 12.0, "se": 1.0},
                "fit_cpu_seconds": {"mean": 23.0, "se": 1.0},
            }
        },
    }

    table = render_ablation(summary)

    assert "| k8 | `--model.inner_steps 8` | 0.500 ± 0.020 |" in table
    assert "| 0.02 / 0.06 / 0.26 |" in table
    assert table.rstrip().endswith("| 1.0 | 23 |")

    summary["cells"]["k8"]["args"] = ["--model.adversaries", "[{name: a},\n {name: b}]"]
    assert "`--model.adversaries [{name: a}, {name: b}]`" in render_ablation(summary)
    assert "average the held-out attacks" in table


@pytest.mark.slow
def test_tiny_ablation_runs_cells_and_resumes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    source = tmp_path / "source"
    fit = [sys.executable, "-m", "tar_lightning.cli", "fit", "--config", FIT_CONFIGS[0], "--config", FIT_CONFIGS[1]]
    done = subprocess.run([*fit, "--pipeline.run_dir", str(source), "--pipeline.evaluation.enabled", "false"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (source / "report.json").exists(), "evaluation.enabled false still evaluated"
    config = AblationConfig(
        cells=[AblationCell("default"), AblationCell("no_tr", args=["--model.tr_weight", "0"])],
        seeds=[1],
        fit_configs=FIT_CONFIGS,
        redteam_config=str(ROOT / "configs" / "redteam" / "wkr.yaml"),
        redteam_args=["--redteam.attacks", TINY_ATTACK, "--redteam.seeds", "[0]"],
        source_run=str(source),
        output_dir=str(tmp_path / "ablate"),
    )

    summary = run_ablation(config)

    assert list(summary["cells"]) == ["default", "no_tr"]
    for entry in summary["cells"].values():
        assert len(entry["per_seed"]) == 1
        assert 0.0 <= entry["forget_after_mean"]["mean"] <= 1.0
        assert entry["fit_seconds"]["mean"] > 0
        assert entry["fit_cpu_seconds"]["mean"] > 0
        # The tiny attack has 3 steps, so no durability step is reached.
        assert math.isnan(entry["forget_at_step_16"]["mean"])
    run_dir = tmp_path / "ablate" / "no_tr" / "seed1"
    assert (run_dir / "base").is_symlink()
    assert "tr_weight: 0" in (run_dir / "config.yaml").read_text()
    for name in ("ablation.json", "ablation.md", "ablation.png"):
        assert (tmp_path / "ablate" / name).is_file()
    # The source run's base and safeguard models face the same attack, for reference rows.
    assert list(summary["references"]) == ["base", "safeguard"]
    reference_report = json.loads((tmp_path / "ablate" / "reference" / "report.json").read_text())["models"]
    assert sorted(reference_report) == ["base", "safeguard"]
    assert summary["references"]["safeguard"]["forget_before"] == reference_report["safeguard"]["before"]["forget_acc"]
    assert "| safeguard | (reference: source run, no TAR) |" in (tmp_path / "ablate" / "ablation.md").read_text()

    # A second run reuses every trained model and cached red-team result.
    timing = (run_dir / "fit_seconds.json").read_text()
    again = run_ablation(config)
    assert (run_dir / "fit_seconds.json").read_text() == timing
    assert again["cells"]["no_tr"]["forget_after_mean"]["mean"] == summary["cells"]["no_tr"]["forget_after_mean"]["mean"]


def test_references_need_source_run(tmp_path):
    config = AblationConfig(
        cells=[AblationCell("k8", ["--model.inner_steps", "8"], share_stages=False)],
        fit_configs=FIT_CONFIGS,
        redteam_config=str(ROOT / "configs" / "redteam" / "wkr.yaml"),
        source_run=str(tmp_path / "missing_run"),
    )
    assert config.validate() == [
        f"ablation.source_run {tmp_path / 'missing_run'} lacks ['world', 'base', 'safeguard']; run `make train "
        "OBJECTIVE=wkr` first, or set share_stages: false on every cell and references: []"
    ]

    config.references = []
    assert config.validate() == []


def test_table_and_plot_show_reference_models(tmp_path):
    def metric(value):
        return {"mean": value, "se": 0.01}

    scores = {
        "forget_before": 0.355, "forget_after_mean": 0.517, "forget_after_worst": 0.697, "retain_after_mean": 0.904,
        "adversary_after_mean": 0.676, "collapsed_attacks": 0, "forget_at_step_16": 0.34, "forget_at_step_64": 0.47,
        "forget_at_step_256": 0.62,
    }
    entry = {
        "args": [],
        **{key: metric(0.4) for key in ("forget_before", "forget_after_mean", "forget_after_worst", "retain_after_mean", "adversary_after_mean")},
        **{f"forget_at_step_{step}": metric(step / 400) for step in (16, 64, 256)},
        "collapsed_attacks": metric(0.0),
        "fit_seconds": metric(300.0),
        "fit_cpu_seconds": metric(550.0),
    }
    summary = {"seeds": [0], "held_out_only": True, "cells": {"default": entry}, "references": {"safeguard": scores}}

    table = render_ablation(summary)
    plot_ablation(summary, tmp_path / "ablation.png")

    assert table.rstrip().splitlines()[-1] == (
        "| safeguard | (reference: source run, no TAR) | 0.355 | 0.517 | 0.697 | 0.34 / 0.47 / 0.62 | 0.904 | 0.676 | 0 | |"
    )
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_only_selects_cells_and_rejects_unknown_names(tmp_path):
    cells = [AblationCell("default", share_stages=False), AblationCell("k8", ["--model.inner_steps", "8"], share_stages=False)]
    config = AblationConfig(
        cells=cells, fit_configs=FIT_CONFIGS, redteam_config=str(ROOT / "configs" / "redteam" / "wkr.yaml"), only=["k8"], references=[]
    )
    assert [cell.name for cell in config.selected_cells()] == ["k8"]
    assert config.validate() == []

    config.only = ["k8", "k99"]
    assert config.validate() == ["ablation.only names unknown cells ['k99']; the cells are ['default', 'k8']"]


def test_plot_draws_compute_and_durability_panels(tmp_path):
    def metric(value):
        return {"mean": value, "se": 0.01}

    entry = {
        "args": [],
        "forget_after_mean": metric(0.4),
        "adversary_after_mean": metric(0.5),
        "fit_seconds": metric(300.0),
        "fit_cpu_seconds": metric(550.0),
        **{f"forget_at_step_{step}": metric(step / 400) for step in (16, 64, 256)},
    }
    path = tmp_path / "ablation.png"

    plot_ablation({"cells": {"default": entry}}, path)

    assert path.stat().st_size > 10_000


def test_durability_averages_attacks_reaching_step():
    long_attack = {"curve": {"steps": [16, 64, 256], "mean": [0.3, 0.4, 0.6]}}
    short_attack = {"curve": {"steps": [16, 64], "mean": [0.5, 0.2]}}

    durability = _durability([long_attack, short_attack])

    assert durability["forget_at_step_16"] == pytest.approx(0.4)
    assert durability["forget_at_step_64"] == pytest.approx(0.3)
    assert durability["forget_at_step_256"] == pytest.approx(0.6)
