"""Ablations: TAR trained under several settings and seeds, each scored by the red-team.

A cell is a named list of ``tar-lightning fit`` overrides. Every cell runs once per training
seed, in a run directory of its own, as a separate process: ``fit`` (timed, for the compute
axis), then ``redteam`` on the TAR model with the held-out attacks of the suite. Cells that
share the initial stages link the world, base and safeguard models of one finished run, so
only TAR training and its red-team run per cell. Both commands skip or resume finished work,
so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tar_lightning.errors import ConfigError

log = logging.getLogger("tar_lightning")

# Stages a cell with ``share_stages`` links from the source run instead of running them.
SHARED_STAGES = ("world", "base", "safeguard")
# Attack steps of the durability columns. Forget accuracy this far into each attack, averaged
# over the scored attacks, separates a defence that delays the attacker from one that prevents.
DURABILITY_STEPS = (16, 64, 256)


@dataclass
class AblationCell:
    """One setting of the ablation.

    Args:
        name: Label in the table and folder name of its runs.
        args: Command-line overrides of ``tar-lightning fit``, for example
            ``["--model.inner_steps", "32"]``.
        share_stages: Link the world, base and safeguard models of ``source_run``; set it to
            false for a cell that changes them (safeguard strength, model size).
    """

    name: str
    args: list[str] = field(default_factory=list)
    share_stages: bool = True


@dataclass
class AblationConfig:
    """Cells, seeds and scoring of an ablation.

    Args:
        cells: The settings to compare.
        seeds: Training seeds; each sets ``seed_everything``, ``model.seed`` and ``data.seed``.
        fit_configs: Config files of ``tar-lightning fit``, in order.
        redteam_config: Config file of ``tar-lightning redteam``; its ``run_dir`` is set to each run.
        redteam_args: Extra overrides of the red-team, for example fewer attack seeds.
        source_run: Finished training run whose world, base and safeguard models shared cells link.
        output_dir: Folder of the runs and of ablation.json, ablation.md and ablation.png.
        held_out_only: Score with the suite's held-out attacks only.
        only: Names of the cells to run and tabulate; ``null`` runs them all. Separate
            commands, each with its own cells, can share one ``output_dir``.
        references: Models of ``source_run`` red-teamed after the cells, with their attacks and
            seeds, for reference rows: the safeguard a cell starts from, and the base model
            before any safeguard. ``[]`` skips them.
    """

    cells: list[AblationCell] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    fit_configs: list[str] = field(default_factory=lambda: ["configs/wkr.yaml"])
    redteam_config: str = "configs/redteam/wkr.yaml"
    redteam_args: list[str] = field(default_factory=list)
    source_run: str = "checkpoints/wkr"
    output_dir: str = "checkpoints/ablate/wkr"
    held_out_only: bool = True
    only: list[str] | None = None
    references: list[str] = field(default_factory=lambda: ["base", "safeguard"])

    def selected_cells(self) -> list[AblationCell]:
        return [cell for cell in self.cells if self.only is None or cell.name in self.only]

    def validate(self) -> list[str]:
        problems = []
        names = [cell.name for cell in self.cells]
        if not names:
            problems.append("ablation.cells must list at least one cell")
        if len(set(names)) != len(names):
            problems.append(f"ablation.cells names must be unique, got {names}")
        unknown = sorted(set(self.only or []) - set(names))
        if unknown:
            problems.append(f"ablation.only names unknown cells {unknown}; the cells are {names}")
        if not self.seeds:
            problems.append("ablation.seeds must list at least one seed")
        for path in [*self.fit_configs, self.redteam_config]:
            if not Path(path).is_file():
                problems.append(f"ablation: config file {path} not found")
        if any(cell.share_stages for cell in self.selected_cells()) or self.references:
            needed = dict.fromkeys([*SHARED_STAGES, *self.references])
            missing = [stage for stage in needed if not (Path(self.source_run) / stage).exists()]
            if missing:
                problems.append(
                    f"ablation.source_run {self.source_run} lacks {missing}; run `make train OBJECTIVE=wkr` first, "
                    "or set share_stages: false on every cell and references: []"
                )
        return problems


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], log_path: Path) -> tuple[float, float]:
    """Run ``command`` with its output appended to ``log_path``; return its wall-clock and CPU seconds.

    CPU seconds (user plus system, over all threads) stay comparable when other work shares
    the machine, which wall-clock seconds do not.
    """
    start, start_cpu = time.perf_counter(), _children_cpu_seconds()
    with log_path.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    if process.returncode != 0:
        raise RuntimeError(f"command failed with exit code {process.returncode}; see {log_path}")
    return time.perf_counter() - start, _children_cpu_seconds() - start_cpu


def _link_stages(source: Path, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        target = run_dir / stage
        if not target.exists():
            target.symlink_to((source / stage).resolve(), target_is_directory=True)


def run_cell(config: AblationConfig, cell: AblationCell, seed: int) -> dict:
    """Train and red-team one cell with one seed; return its red-team summary and training time."""
    run_dir = Path(config.output_dir) / cell.name / f"seed{seed}"
    if cell.share_stages:
        _link_stages(Path(config.source_run), run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timing = run_dir / "fit_seconds.json"

    fit = [sys.executable, "-m", "tar_lightning.cli", "fit"]
    for path in config.fit_configs:
        fit += ["--config", path]
    fit += ["--pipeline.run_dir", str(run_dir), "--pipeline.evaluation.enabled", "false"]
    fit += ["--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed), *cell.args]
    if not (run_dir / "tar" / "config.json").is_file():
        seconds, cpu_seconds = _run(fit, run_dir / "ablation.log")
        timing.write_text(json.dumps({"fit_seconds": seconds, "fit_cpu_seconds": cpu_seconds}) + "\n")

    redteam = [sys.executable, "-m", "tar_lightning.cli", "redteam", "--config", config.redteam_config, "--run_dir", str(run_dir)]
    redteam += ["--redteam.checkpoints", f"[{run_dir / 'tar'}]", "--redteam.extend_report", "null"]
    redteam += ["--redteam.held_out_only", str(config.held_out_only).lower(), *config.redteam_args]
    _run(redteam, run_dir / "ablation.log")

    report = json.loads((run_dir / "redteam" / "report.json").read_text())["models"]["tar"]
    times = json.loads(timing.read_text()) if timing.is_file() else {}
    return {
        **_scores(report, config.held_out_only),
        "fit_seconds": times.get("fit_seconds", float("nan")),
        "fit_cpu_seconds": times.get("fit_cpu_seconds", float("nan")),
    }


def run_references(config: AblationConfig) -> dict[str, dict]:
    """Red-team the ``references`` models of the source run with the cells' attacks and seeds."""
    if not config.references:
        return {}
    out = Path(config.output_dir) / "reference"
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = ",".join(str(Path(config.source_run) / name) for name in config.references)
    redteam = [sys.executable, "-m", "tar_lightning.cli", "redteam", "--config", config.redteam_config, "--run_dir", config.source_run]
    redteam += ["--redteam.checkpoints", f"[{checkpoints}]", "--redteam.output_dir", str(out), "--redteam.extend_report", "null"]
    redteam += ["--redteam.held_out_only", str(config.held_out_only).lower(), *config.redteam_args]
    log.info("ablation: reference models %s", config.references)
    _run(redteam, out / "ablation.log")
    models = json.loads((out / "report.json").read_text())["models"]
    return {name: _scores(models[name], config.held_out_only) for name in config.references}


def _scores(report: dict, held_out_only: bool) -> dict[str, float]:
    """Compute the table's metrics from one model's section of a red-team report."""
    after = report["attacks"].values()
    return {
        **_durability(after),
        "forget_before": report["before"]["forget_acc"],
        "retain_before": report["before"]["retain_acc"],
        "forget_after_mean": report["held_out_mean"] if held_out_only else float(np.mean([a["forget_acc"]["mean"] for a in after])),
        "forget_after_worst": report["worst_attack"]["value"],
        "retain_after_mean": float(np.mean([a["retain_acc"]["mean"] for a in after])),
        "adversary_after_mean": float(np.mean([a["adversary_acc"]["mean"] for a in after if "adversary_acc" in a])),
        "collapsed_attacks": len(report["collapsed_attacks"]),
    }


def _durability(attacks) -> dict[str, float]:
    """Forget accuracy at each of ``DURABILITY_STEPS``, averaged over the attacks that reach it."""
    curves = {}
    for step in DURABILITY_STEPS:
        values = [
            attack["curve"]["mean"][attack["curve"]["steps"].index(step)]
            for attack in attacks
            if "curve" in attack and step in attack["curve"]["steps"]
        ]
        curves[f"forget_at_step_{step}"] = float(np.mean(values)) if values else float("nan")
    return curves


def _mean_se(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return {"mean": float(array.mean()), "se": se}


def run_ablation(config: AblationConfig) -> dict:
    """Run every cell and seed, then write ablation.json, ablation.md and ablation.png; return the summary."""
    problems = config.validate()
    if problems:
        raise ConfigError.from_problems("invalid ablation config", problems)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seeds": config.seeds, "held_out_only": config.held_out_only, "cells": {}}
    for cell in config.selected_cells():
        runs = []
        for seed in config.seeds:
            log.info("ablation: cell %s, seed %d", cell.name, seed)
            runs.append(run_cell(config, cell, seed))
        metrics = {key: _mean_se([run[key] for run in runs]) for key in runs[0]}
        summary["cells"][cell.name] = {"args": cell.args, "per_seed": runs, **metrics}
        (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["references"] = run_references(config)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ablation.md").write_text(render_ablation(summary))
    plot_ablation(summary, out / "ablation.png")
    return summary


def render_ablation(summary: dict) -> str:
    """Render one table row per cell: means ± standard errors over training seeds."""

    def cell(metric: dict) -> str:
        return f"{metric['mean']:.3f}" if math.isnan(metric["se"]) else f"{metric['mean']:.3f} ± {metric['se']:.3f}"

    scope = "held-out attacks" if summary["held_out_only"] else "all attacks"
    steps = " / ".join(str(step) for step in DURABILITY_STEPS)
    lines = [
        f"Means over training seeds {summary['seeds']} ± standard error; post-attack columns average the {scope}.",
        f"Durability: forget accuracy after {steps} attack steps. Training CPU seconds count every thread.",
        "",
        "| cell | overrides | forget before | forget after, mean | forget after, worst attack | durability "
        f"({steps} steps) | retain after | attacker's own facts | collapsed attacks | training CPU seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["cells"].items():
        # YAML folded lists can carry newlines, which would break the table row.
        overrides = " ".join(" ".join(arg.split()) for arg in entry["args"]) or "(defaults)"
        durability = " / ".join(f"{entry[f'forget_at_step_{step}']['mean']:.2f}" for step in DURABILITY_STEPS)
        lines.append(
            f"| {name} | `{overrides}` | {cell(entry['forget_before'])} | {cell(entry['forget_after_mean'])} | "
            f"{cell(entry['forget_after_worst'])} | {durability} | {cell(entry['retain_after_mean'])} | "
            f"{cell(entry['adversary_after_mean'])} | {entry['collapsed_attacks']['mean']:.1f} | {_compute(entry)['mean']:.0f} |"
        )
    for name, scores in summary.get("references", {}).items():
        durability = " / ".join(f"{scores[f'forget_at_step_{step}']:.2f}" for step in DURABILITY_STEPS)
        lines.append(
            f"| {name} | (reference: source run, no TAR) | {scores['forget_before']:.3f} | {scores['forget_after_mean']:.3f} | "
            f"{scores['forget_after_worst']:.3f} | {durability} | {scores['retain_after_mean']:.3f} | "
            f"{scores['adversary_after_mean']:.3f} | {scores['collapsed_attacks']} | |"
        )
    return "\n".join(lines) + "\n"


def _compute(entry: dict) -> dict[str, float]:
    """Training CPU seconds, or wall-clock seconds for runs recorded before CPU time was."""
    cpu = entry.get("fit_cpu_seconds")
    return cpu if cpu is not None and not math.isnan(cpu["mean"]) else entry["fit_seconds"]


def plot_ablation(summary: dict, path: Path) -> None:
    """Left: post-attack forget accuracy against training compute, one point per cell with
    error bars. Middle: the same against the attacker's accuracy on its own training facts,
    which shows resistance that comes from damage to fine-tuning in general. Right: the
    durability curve of each cell, forget accuracy against attack step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    has_curve = False
    for index, (name, entry) in enumerate(summary["cells"].items()):
        color = f"C{index % 10}"
        y = entry["forget_after_mean"]
        for ax, x in ((left, _compute(entry)), (middle, entry["adversary_after_mean"])):
            ax.errorbar(x["mean"], y["mean"], xerr=np.nan_to_num(x["se"]), yerr=np.nan_to_num(y["se"]), fmt="o", capsize=3, color=color)
            ax.annotate(name, (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        curve = [entry[f"forget_at_step_{step}"]["mean"] for step in DURABILITY_STEPS]
        if not all(math.isnan(value) for value in curve):
            right.plot(DURABILITY_STEPS, curve, marker="o", color=color, label=name)
            has_curve = True
    for index, (name, scores) in enumerate(summary.get("references", {}).items()):
        style = {"color": "gray", "linestyle": ("--", "-.", ":")[index % 3], "linewidth": 1}
        left.axhline(scores["forget_after_mean"], label=f"{name} (reference)", **style)
        middle.plot(scores["adversary_after_mean"], scores["forget_after_mean"], marker="s", color="gray")
        middle.annotate(f"{name} (reference)", (scores["adversary_after_mean"], scores["forget_after_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        right.plot(DURABILITY_STEPS, [scores[f"forget_at_step_{step}"] for step in DURABILITY_STEPS], label=f"{name} (reference)", **style)
    if summary.get("references"):
        left.legend(fontsize=7)
    middle.set_xlim(0, 1)
    middle.set_xlabel("attacker's accuracy on its own training facts, mean")
    middle.set_ylabel("forget accuracy after attack, mean")
    for ax in (left, middle, right):
        ax.axhline(0.25, color="black", linestyle=":", linewidth=1)
        ax.set_ylim(0, 1)
    left.set_xlabel("TAR training CPU seconds")
    left.set_ylabel("forget accuracy after attack, mean (dotted: chance)")
    if has_curve:
        right.set_xscale("log", base=2)
        right.set_xticks(DURABILITY_STEPS, [str(step) for step in DURABILITY_STEPS])
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, f"no attack reached step {DURABILITY_STEPS[0]}", ha="center", transform=right.transAxes)
    right.set_xlabel("attack step")
    right.set_ylabel("forget accuracy, mean over attacks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
