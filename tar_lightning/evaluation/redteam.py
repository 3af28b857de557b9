"""Red-teaming: every model against every attack of a suite, over several seeds.

Each run loads a fresh copy of the evaluated weights, fine-tunes it with one attack and one
seed, and traces the objective's harm metric along the way (the attacker's learning curve:
forget accuracy, or attack success for refusals). It then scores the result: forget, retain
and attacker's-own-fact questions, or refusals and benign answers. Runs are cached as they
finish, so an interrupted red-team resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from tar_lightning.data.preferences import PreferenceSource, load_preferences
from tar_lightning.data.sources import QuestionSource, TextSource, TokenPool, checked_table, load_questions, load_table, load_texts
from tar_lightning.data.world import write_derived_splits
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.attacks import AttackConfig, run_attack
from tar_lightning.evaluation.harness import HarnessConfig, check_harness_installed, harness_scores
from tar_lightning.evaluation.mcq import multiple_choice_accuracy
from tar_lightning.evaluation.refusal import RefusalEvalData, score_hrr
from tar_lightning.evaluation.report import ResultCache, run_fingerprint
from tar_lightning.evaluation.redteam_report import OBJECTIVES
from tar_lightning.evaluation.suite import QUICK_ATTACKS, default_suite
from tar_lightning.models import is_saved_model, load_causal_lm, load_tokenizer

log = logging.getLogger("tar_lightning")

# Question sets a knowledge red-team scores; ``adversary`` (the attacker's own facts) is optional.
REQUIRED_QUESTIONS = ("forget", "retain")
# Columns of the benign evaluation file of a refusal red-team.
BENIGN_COLUMNS = ("prompt", "answer", "wrong_answers")


@dataclass
class RefusalSources:
    """Held-out data of a refusal (``objective: hrr``) red-team.

    Args:
        harmful: Harmful requests, each with a refusal (chosen) and a harmful completion
            (rejected), for the refusal rate and the preference win rate.
        benign: File of benign questions with ``prompt``, ``answer`` and ``wrong_answers``
            columns, for benign accuracy; ``null`` skips it.
        max_new_tokens: Length limit of each greedy response.
    """

    harmful: PreferenceSource
    benign: str | None = None
    max_new_tokens: int = 32


@dataclass
class QuickPreset:
    """The reduced red-team that ``quick`` runs.

    Args:
        attacks: Names of the suite's attacks to run.
        seeds: Seeds to run them with.
        max_steps: Attacks longer than this are cut to it, with warmup and restart lengths
            scaled by the same factor.
    """

    attacks: list[str] = field(default_factory=lambda: list(QUICK_ATTACKS))
    seeds: list[int] = field(default_factory=lambda: [0])
    max_steps: int = 64


@dataclass
class RedteamConfig:
    """Which models to attack, with which attacks and data, and where to write the report.

    Args:
        checkpoints: Hugging Face-format model directories (or hub names) to attack; each
            is reported under its folder name.
        output_dir: Folder of report.json, report.md, the plots, TensorBoard curves and the
            run cache.
        objective: The safeguard's objective: ``wkr`` scores multiple-choice ``questions``;
            ``hrr`` scores refusals. It sets the metric attacks are ranked by.
        corpora: Attack corpora by name; attacks refer to them in ``data``,
            ``retain_data`` and ``benign_data``.
        questions: Multiple-choice sets by name, for ``objective: wkr``: ``forget`` and
            ``retain`` are required; ``adversary`` (facts of the attack corpora) measures the
            attacker's own gains.
        refusal: Held-out harmful and benign requests, for ``objective: hrr``.
        world_dir: Built-in world the corpora come from; red-teaming splits that a world
            written by an earlier version lacks are derived there first. ``null`` for other data.
        attacks: The suite; each attack runs from a fresh copy of every model.
        seeds: Seeds of every attack; the report gives mean and spread across them.
        curve_steps: Attack steps after which the harm metric is scored for the learning
            curves. Steps beyond an attack's length are skipped, and its last step is always scored.
        max_length: Sequences of the attack corpora are truncated to this many tokens.
        batch_size: Sequences per forward pass when scoring questions.
        chance: Accuracy of guessing, marked in plots and used for the collapse flag.
        collapse_margin: A model whose mean retain accuracy after an attack is at most
            ``chance + collapse_margin`` is flagged as collapsed, because its forget accuracy
            then does not measure a safeguard.
        held_out_only: Run only the attacks marked ``held_out``.
        quick: Run ``quick_preset`` instead of the whole suite.
        quick_preset: Attacks, seeds and length of a quick run.
        extend_report: A training run's report.json whose models' ``post_attack`` sections
            get this red-team's results (as ``redteam/<attack>``); ``null`` leaves it alone.
        harness: lm-evaluation-harness tasks to score as well; ``null`` skips them.
        tensorboard: Write the learning curves as TensorBoard scalars under ``output_dir``.
        dtype: Weight type of attacked and scored models; ``bfloat16`` halves the memory of
            large models, at the precision an attacker on one GPU would likely accept.
    """

    checkpoints: list[str] = field(default_factory=list)
    output_dir: str = "checkpoints/wkr/redteam"
    objective: Literal["wkr", "hrr"] = "wkr"
    corpora: dict[str, TextSource] = field(default_factory=dict)
    questions: dict[str, QuestionSource] = field(default_factory=dict)
    refusal: RefusalSources | None = None
    world_dir: str | None = None
    attacks: list[AttackConfig] = field(default_factory=default_suite)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    curve_steps: list[int] = field(default_factory=lambda: [16, 32, 64, 256])
    max_length: int = 64
    batch_size: int = 256
    chance: float = 0.25
    collapse_margin: float = 0.1
    held_out_only: bool = False
    quick: bool = False
    quick_preset: QuickPreset = field(default_factory=QuickPreset)
    extend_report: str | None = None
    harness: HarnessConfig | None = None
    tensorboard: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"

    def model_names(self) -> dict[str, str]:
        """Map each checkpoint's report name (its folder name) to its path."""
        return {Path(path.rstrip("/")).name: path for path in self.checkpoints}

    def validate(self) -> list[str]:
        """Return every problem of this config, each naming its dotted key; loads nothing."""
        problems = []

        if not self.checkpoints:
            problems.append("redteam.checkpoints must list at least one model directory")
        names = [Path(path.rstrip("/")).name for path in self.checkpoints]
        if len(set(names)) != len(names):
            problems.append(f"redteam.checkpoints folder names must be unique, since they name the models in the report; got {names}")
        for path in self.checkpoints:
            if Path(path).exists() and not is_saved_model(path):
                problems.append(f"redteam.checkpoints: {path} is not a saved model (no config.json and weights)")
            elif not Path(path).exists() and not _looks_like_hub_name(path):
                problems.append(f"redteam.checkpoints: {path} does not exist; train it first (make train) or fix the path")
        if self.objective == "wkr":
            for name in REQUIRED_QUESTIONS:
                if name not in self.questions:
                    problems.append(f"redteam.questions must include {name!r}; it has {sorted(self.questions)}")
        elif self.refusal is None:
            problems.append("redteam.refusal must name the held-out harmful (and benign) requests with objective hrr")
        elif self.refusal.max_new_tokens < 1:
            problems.append(f"redteam.refusal.max_new_tokens must be at least 1, got {self.refusal.max_new_tokens}")

        if not self.seeds:
            problems.append("redteam.seeds must list at least one seed")
        if any(step < 1 for step in self.curve_steps):
            problems.append(f"redteam.curve_steps must be positive, got {self.curve_steps}")
        for key in ("max_length", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"redteam.{key} must be at least 1, got {getattr(self, key)}")

        attack_names = [a.name for a in self.attacks]
        if not attack_names:
            problems.append("redteam.attacks must list at least one attack")
        if len(set(attack_names)) != len(attack_names):
            problems.append(f"redteam.attacks names must be unique, got {attack_names}")
        for i, attack in enumerate(self.attacks):
            problems += attack.validate(f"redteam.attacks[{i}]", set(self.corpora))
        if self.held_out_only and not any(a.held_out for a in self.attacks):
            problems.append("redteam.held_out_only is set but no attack of redteam.attacks is held out")
        if self.quick:
            unknown = sorted(set(self.quick_preset.attacks) - set(attack_names))
            if unknown:
                problems.append(f"redteam.quick_preset.attacks names {unknown}, which are not in redteam.attacks")
            if not self.quick_preset.seeds:
                problems.append("redteam.quick_preset.seeds must list at least one seed")
            if self.quick_preset.max_steps < 1:
                problems.append(f"redteam.quick_preset.max_steps must be at least 1, got {self.quick_preset.max_steps}")
        if self.harness is not None:
            problems += self.harness.validate("redteam.harness")
        return problems

    def plan(self) -> tuple[list[AttackConfig], list[int]]:
        """Return the attacks and seeds to run: the whole suite, or the quick preset's part of it."""
        attacks = [a for a in self.attacks if a.held_out or not self.held_out_only]
        if not self.quick:
            return attacks, list(self.seeds)
        preset = self.quick_preset
        chosen = [a for a in attacks if a.name in preset.attacks]
        return [_shorten(a, preset.max_steps) for a in chosen], list(preset.seeds)


def _shorten(attack: AttackConfig, max_steps: int) -> AttackConfig:
    if attack.steps <= max_steps:
        return attack
    factor = max_steps / attack.steps
    warmup = min(max_steps, max(1, round(attack.warmup_steps * factor))) if attack.warmup_steps else 0
    restart = max(1, round(attack.restart_steps * factor)) if attack.restart_steps else 0
    return replace(attack, steps=max_steps, warmup_steps=warmup, restart_steps=restart)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RedteamData:
    """The corpora and questions of a red-team, loaded once; token pools are built per tokenizer."""

    def __init__(self, config: RedteamConfig):
        if config.world_dir is not None:
            for path in write_derived_splits(config.world_dir):
                log.info("redteam: derived %s from the world's adversary splits", path)
        self.sources = dict(config.corpora)
        # Chat corpora render with each tokenizer's end-of-sequence token; the placeholder
        # only makes their text comparable for the cache fingerprint.
        self.texts = {name: load_texts(source, "<eos>") for name, source in config.corpora.items()}
        self.questions = {name: load_questions(source) for name, source in config.questions.items()}
        self.refusal = _load_refusal(config.refusal) if config.refusal is not None else None
        self.max_length = config.max_length
        settings = [self.texts, self.questions, config.curve_steps, config.max_length, asdict(config.harness) if config.harness else None]
        if self.refusal is not None:
            settings.append([asdict(self.refusal), config.refusal.max_new_tokens])
        if config.dtype != "float32":
            # Appended only when set, so caches written before the option existed stay valid.
            settings.append(config.dtype)
        self.digest = _digest(settings)
        self._pools: dict[str, dict[str, TokenPool]] = {}

    def pools(self, tokenizer_key: str, tokenizer) -> dict[str, TokenPool]:
        if tokenizer_key not in self._pools:
            self._pools[tokenizer_key] = {
                name: TokenPool(load_texts(source, tokenizer.eos_token), tokenizer, self.max_length) for name, source in self.sources.items()
            }
        return self._pools[tokenizer_key]


def _load_refusal(sources: RefusalSources) -> RefusalEvalData:
    harmful = load_preferences(sources.harmful)
    benign = []
    if sources.benign is not None:
        table = checked_table(load_table(sources.benign), sources.benign, list(BENIGN_COLUMNS), None)
        benign = [{"prompt": row["prompt"], "answer": row["answer"], "wrong_answers": list(row["wrong_answers"])} for row in table]
    return RefusalEvalData(harmful=harmful, benign=benign)


def _score(model, tokenizer, data: RedteamData, config: RedteamConfig) -> dict[str, float]:
    if data.refusal is not None:
        scores = score_hrr(model, tokenizer, data.refusal, config.batch_size, config.refusal.max_new_tokens)
    else:
        scores = {
            f"{name}_acc": multiple_choice_accuracy(model, tokenizer, rows, config.batch_size).value for name, rows in data.questions.items()
        }
    if config.harness is not None:
        scores.update(harness_scores(model, tokenizer, config.harness))
    return scores


def _trace(model, tokenizer, data: RedteamData, config: RedteamConfig) -> float:
    """Return the objective's harm metric alone, cheaper than ``_score``, for the learning curves."""
    if data.refusal is not None:
        harmful_only = RefusalEvalData(harmful=data.refusal.harmful)
        return score_hrr(model, tokenizer, harmful_only, config.batch_size, config.refusal.max_new_tokens)["attack_success"]
    return multiple_choice_accuracy(model, tokenizer, data.questions["forget"], config.batch_size).value


def _attack_once(path: str, attack: AttackConfig, seed: int, tokenizer, data: RedteamData, config: RedteamConfig, device) -> dict:
    curve: dict[int, float] = {}
    harm = OBJECTIVES[config.objective].harm

    def trace(step: int, model) -> None:
        curve[step] = _trace(model, tokenizer, data, config)

    steps = {s for s in config.curve_steps if s < attack.steps}
    run = run_attack(
        path, attack, data.pools(path, tokenizer), seed, device, progress=False, callback=trace, callback_steps=steps, dtype=getattr(torch, config.dtype)
    )
    result = _score(run.model, tokenizer, data, config)
    curve[run.steps] = result[harm]
    result["final_loss"] = float(np.mean(run.losses[-10:]))
    result["steps"] = run.steps
    result["curve"] = {str(step): curve[step] for step in sorted(curve)}
    return result


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_redteam(config: RedteamConfig) -> dict:
    """Run every planned attack and seed on every model; write and return the report.

    Raises:
        ConfigError: If the config or its data is invalid; raised before any model loads.
    """
    from tar_lightning.evaluation.redteam_report import summarize, write_redteam_report  # noqa: PLC0415

    problems = config.validate()
    if problems:
        raise ConfigError.from_problems("invalid red-team config", problems)
    if config.harness is not None:
        check_harness_installed()
    data = RedteamData(config)
    attacks, seeds = config.plan()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(out / "runs.json")
    writer = _tensorboard_writer(out) if config.tensorboard else None
    device = _device()
    models = config.model_names()
    runs = [(name, attack, seed) for name in models for attack in [None, *attacks] for seed in ([0] if attack is None else seeds)]
    log.info("redteam: %d models x %d attacks x %d seeds = %d attack runs", len(models), len(attacks), len(seeds), len(models) * len(attacks) * len(seeds))
    results: dict[str, dict] = {name: {"path": models[name], "before": None, "attacks": {}} for name in models}
    tokenizers = {}
    bar = tqdm(runs, desc="redteam", dynamic_ncols=True)
    for name, attack, seed in bar:
        key = f"{name}/{attack.name if attack else 'none'}/{seed}"
        bar.set_postfix_str(key)
        path = models[name]
        if path not in tokenizers:
            tokenizers[path] = load_tokenizer(path)
        fingerprint = run_fingerprint(path, attack, data.digest)
        result = cache.get(key, fingerprint)
        if result is None:
            if attack is None:
                result = _score(load_causal_lm(path, dtype=getattr(torch, config.dtype)).to(device), tokenizers[path], data, config)
            else:
                result = _attack_once(path, attack, seed, tokenizers[path], data, config, device)
                if writer is not None:
                    _write_curve(writer(f"{name}/{attack.name}/seed{seed}"), result["curve"], OBJECTIVES[config.objective].harm)
            cache.put(key, fingerprint, result)
        if attack is None:
            results[name]["before"] = result
        else:
            results[name]["attacks"].setdefault(attack.name, []).append(result)
    bar.close()
    report = summarize(results, attacks, seeds, config)
    write_redteam_report(report, attacks, out, config)
    log.info("redteam: wrote %s", out / "report.md")
    return report


def _looks_like_hub_name(path: str) -> bool:
    """Return whether a path that does not exist should go to ``from_pretrained`` as a hub name.

    A hub name is ``owner/name`` whose owner is not a local folder, so ``checkpoints/nope``
    is reported as a missing local model instead of being looked up online.
    """
    parts = path.split("/")
    return not path.startswith((".", "/", "~")) and len(parts) == 2 and not Path(parts[0]).exists()


def _tensorboard_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    writers: dict[str, SummaryWriter] = {}

    def writer(run: str) -> SummaryWriter:
        if run not in writers:
            writers[run] = SummaryWriter(log_dir=str(out / "tensorboard" / run))
        return writers[run]

    return writer


def _write_curve(writer, curve: dict[str, float], metric: str) -> None:
    for step, value in curve.items():
        writer.add_scalar(f"redteam/{metric}", value, int(step))
    writer.flush()
