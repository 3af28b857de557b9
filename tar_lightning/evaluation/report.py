"""Score models before and after attacks, and write report.json, report.md and report.png."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tar_lightning.data.sources import TokenPool
from tar_lightning.evaluation.attacks import AttackConfig, run_attack
from tar_lightning.evaluation.mcq import multiple_choice_accuracy
from tar_lightning.models import load_causal_lm, load_tokenizer

CHANCE = 0.25


def _scores(model, tokenizer, questions: dict[str, list[dict]], batch_size: int) -> dict[str, float]:
    scores = {}
    for name, rows in questions.items():
        accuracy = multiple_choice_accuracy(model, tokenizer, rows, batch_size)
        scores[f"{name}_acc"] = accuracy.value
        scores[f"{name}_acc_se"] = accuracy.stderr
    return scores


def run_fingerprint(model_dir: str, attack: AttackConfig | None, questions_digest: str) -> str:
    """Hash of the model files' sizes and modification times, the attack config and the questions."""
    parts = [json.dumps(asdict(attack), sort_keys=True) if attack else "none", questions_digest]
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Return the mean of ``values`` and its standard error (NaN for a single value)."""
    mean = float(np.mean(values))
    stderr = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return mean, stderr


def summarise_attack(runs: list[dict], attack: AttackConfig) -> dict:
    """Return the seed count, the mean and standard error of every metric, and the per-seed results of one attack."""
    summary: dict = {"seeds": len(runs), "held_out": attack.held_out}
    for metric in runs[0]:
        if not metric.endswith("_se"):
            summary[metric], summary[f"{metric}_se"] = mean_and_stderr([r[metric] for r in runs])
    summary["per_seed"] = runs
    return summary


class ResultCache:
    """Per-run results stored as JSON after every run, so an interrupted evaluation resumes.

    Each result is stored with a fingerprint of what produced it; a result whose fingerprint
    differs (another attack config, retrained weights) is computed again.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, fingerprint: str) -> dict | None:
        entry = self.data.get(key)
        if entry is None or entry.get("fingerprint") != fingerprint:
            return None
        return entry["result"]

    def put(self, key: str, fingerprint: str, value: dict) -> None:
        self.data[key] = {"fingerprint": fingerprint, "result": value}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def evaluate_models(
    models: dict[str, str],
    questions: dict[str, list[dict]],
    attacks: list[AttackConfig],
    seeds: list[int],
    pools: dict[str, TokenPool],
    cache_path: Path,
    device: torch.device,
    batch_size: int = 256,
) -> dict:
    """Score every model before attack and after every attack and seed; return the report dict.

    ``questions`` maps a name (``forget``, ``retain``, ``adversary``) to multiple-choice rows;
    each becomes ``<name>_acc`` and ``<name>_acc_se`` in the report. Post-attack figures are
    means over seeds with the standard error of the mean across seeds. Results already in the
    cache are reused.
    """
    cache = ResultCache(cache_path)
    questions_digest = hashlib.sha256(json.dumps(questions, sort_keys=True).encode()).hexdigest()
    tokenizer = load_tokenizer(next(iter(models.values())))
    report: dict = {"objective": "wkr", "chance": CHANCE, "models": {}}
    runs = [(name, attack, seed) for name in models for attack in [None, *attacks] for seed in ([0] if attack is None else seeds)]
    bar = tqdm(runs, desc="evaluation", dynamic_ncols=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for name, attack, seed in bar:
        key = f"{name}/{attack.name if attack else 'none'}/{seed}"
        bar.set_postfix_str(key)
        fingerprint = run_fingerprint(models[name], attack, questions_digest)
        result = cache.get(key, fingerprint)
        if result is None:
            if attack is None:
                model = load_causal_lm(models[name]).to(device)
                result = _scores(model, tokenizer, questions, batch_size)
            else:
                run = run_attack(models[name], attack, pools, seed, device)
                result = _scores(run.model, tokenizer, questions, batch_size)
                result["final_loss"] = float(np.mean(run.losses[-10:]))
            cache.put(key, fingerprint, result)
        results.setdefault((name, attack.name if attack else "none"), []).append(result)
    bar.close()

    for name in models:
        entry = dict(results[(name, "none")][0])
        entry["post_attack"] = {}
        for attack in attacks:
            runs_of_attack = results[(name, attack.name)]
            summary = summarise_attack(runs_of_attack, attack)
            entry["post_attack"][attack.name] = summary
        forget_after = [entry["post_attack"][a.name]["forget_acc"] for a in attacks]
        entry["post_attack_forget_mean"] = float(np.mean(forget_after)) if forget_after else None
        entry["post_attack_forget_worst"] = float(np.max(forget_after)) if forget_after else None
        report["models"][name] = entry
    return report


def format_cell(value: float | None, stderr: float | None = None) -> str:
    """Format a table cell: ``-`` for no value, ``value ± stderr`` when the error is known."""
    if value is None:
        return "-"
    if stderr is None or math.isnan(stderr):
        return f"{value:.3f}"
    return f"{value:.3f} ± {stderr:.3f}"


def render_markdown(report: dict, attacks: list[AttackConfig], notes: list[str]) -> str:
    """Render the report as Markdown tables: one row per model, before attack and after each attack."""
    lines = [
        f"# Report: {report['objective']}",
        "",
        f"Multiple-choice accuracy, chance {report['chance']}. Forget accuracy: lower is better. "
        "Post-attack cells are means over seeds ± standard error across seeds; "
        "before-attack cells give the binomial standard error of one run.",
        "",
        "| model | forget | retain | " + " | ".join(f"forget after {a.name}" for a in attacks) + " | mean after | worst after |",
        "|---" * (5 + len(attacks)) + "|",
    ]
    for name, entry in report["models"].items():
        cells = [name, format_cell(entry["forget_acc"], entry["forget_acc_se"]), format_cell(entry["retain_acc"], entry["retain_acc_se"])]
        for attack in attacks:
            post = entry["post_attack"][attack.name]
            cells.append(format_cell(post["forget_acc"], post["forget_acc_se"]))
        cells += [format_cell(entry["post_attack_forget_mean"]), format_cell(entry["post_attack_forget_worst"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Retain accuracy and the attacker's accuracy on its own training facts after each attack:", ""]
    lines.append("| model | attack | retain after | attacker's own facts | attacker's final loss |")
    lines.append("|---|---|---|---|---|")
    for name, entry in report["models"].items():
        for attack in attacks:
            post = entry["post_attack"][attack.name]
            own = format_cell(post.get("adversary_acc"), post.get("adversary_acc_se"))
            lines.append(
                f"| {name} | {attack.name} | {format_cell(post['retain_acc'], post['retain_acc_se'])} | {own} | "
                f"{format_cell(post['final_loss'], post['final_loss_se'])} |"
            )
    lines += ["", "Attacks:", ""]
    for attack in attacks:
        schedule = attack.schedule if attack.schedule == "constant" else f"{attack.schedule}, {attack.warmup_steps} warmup steps"
        rtf = f", first {attack.retain_fraction:.0%} of steps on {attack.retain_data}" if attack.retain_fraction else ""
        lines.append(
            f"- `{attack.name}`: {attack.optimizer}, lr {attack.learning_rate:g}, {attack.steps} steps of batch "
            f"{attack.batch_size} on {attack.data}{rtf}, {schedule}; "
            f"{'held out from' if attack.held_out else 'of a kind seen in'} tamper-resistance training."
        )
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def grouped_bar_chart(
    series: dict[str, tuple[list[float], list[float]]],
    columns: list[str],
    chance: float,
    ylabel: str,
    path: Path,
    column_width: float = 1.6,
) -> None:
    """Save a bar chart with one group per column and one bar per series, error bars and chance marked.

    ``series`` maps a legend label to its values and error bar lengths, one per column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(4.0 + column_width * len(columns), 4.5))
    for i, (label, (values, errors)) in enumerate(series.items()):
        positions = np.arange(len(columns)) + (i - (len(series) - 1) / 2) * width
        ax.bar(positions, values, width, yerr=np.nan_to_num(errors), capsize=2, label=label)
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(np.arange(len(columns)), columns, rotation=60 if len(columns) > 6 else 15, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_report(report: dict, attacks: list[AttackConfig], path: Path) -> None:
    """Bar chart of forget accuracy before and after each attack, per model, with chance marked."""
    series = {}
    for name, entry in report["models"].items():
        values = [entry["forget_acc"]] + [entry["post_attack"][a.name]["forget_acc"] for a in attacks]
        errors = [entry["forget_acc_se"]] + [entry["post_attack"][a.name]["forget_acc_se"] for a in attacks]
        series[name] = (values, errors)
    columns = ["before"] + [a.name for a in attacks]
    grouped_bar_chart(series, columns, report["chance"], "forget accuracy (lower is better)", path)


def write_report(report: dict, attacks: list[AttackConfig], run_dir: Path, notes: list[str]) -> None:
    """Write report.json, report.md and report.png under ``run_dir``."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "report.md").write_text(render_markdown(report, attacks, notes))
    plot_report(report, attacks, run_dir / "report.png")
