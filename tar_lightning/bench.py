"""Benchmark of one TAR outer step against the floor of the same forward and backward passes.

    python -m tar_lightning.bench                       # the default plan (see --help)
    python -m tar_lightning.bench --model-size 30M --inner-steps 16

An outer step with K inner steps and TR subsampling s does K adversary passes (forward,
backward, optimizer step) and ceil(K / s) tamper-resistance passes (forward, backward). It
ends with one retain pass: forward and backward of the trained model with hidden states, plus
a no-grad forward of the frozen base model. The floor is the time of those same passes done as plain
training on ``nn.Module``s with ``torch.optim.AdamW``, with the same losses and batch shapes.
Everything above the floor is overhead: weight copies, ``functional_call``, the functional
inner optimizer, the outer schedule-free AdamW update, Python, logging and data.

The TAR side is the real ``TARModule.training_step`` in a real Lightning ``Trainer``. A
callback times each outer step from ``on_train_batch_start`` to ``on_train_batch_end`` and
runs one floor step right after each timed TAR step, so the two alternate in one process and
share whatever load the machine has. Trainer start-up and warm-up steps are not timed.

Models are Llamas built from a config with random weights (nothing is downloaded). Every
batch contains uniformly random token ids at full length, with no padding, served by
``TARDataModule``'s own dataloader from pools of random tokens. The built-in world is not
used, so each model size can have the vocabulary it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from tar_lightning.adversaries import default_adversaries  # noqa: E402
from tar_lightning.data.datamodule import TARDataModule  # noqa: E402
from tar_lightning.data.sources import TextSource, TokenPool  # noqa: E402
from tar_lightning.inner_loop import tr_step_weights  # noqa: E402
from tar_lightning.losses import negative_entropy_loss, next_token_loss, representation_distance  # noqa: E402
from tar_lightning.models import LlamaSize, build_llama, load_causal_lm  # noqa: E402
from tar_lightning.module import TARModule  # noqa: E402

log = logging.getLogger(__name__)

# Pass/fail lines reported next to the measurements; they never change what is measured.
TARGET_MAX_RATIO = 1.10
TARGET_RATIO_FROM_INNER_STEPS = 8
TARGET_MAX_LINEARITY_DEVIATION = 0.10

# The plan that runs when neither --model-size nor --inner-steps is given.
DEFAULT_PLAN: list[tuple[str, list[int]]] = [("2M", [4, 8, 16, 32]), ("30M", [8])]
QUICK_PLAN: list[tuple[str, list[int]]] = [("tiny", [2, 4])]
DEFAULT_INNER_STEPS = [4, 8, 16, 32]
# Default of each numeric option: (normal, with --quick).
SETTING_DEFAULTS: dict[str, tuple[int, int]] = {
    "tr_every": (4, 2),
    "batch_size": (8, 2),
    "seq_len": (64, 16),
    "repeats": (5, 3),
    "warmup": (1, 1),
}
MATMUL_SIZES = {"cpu": 2048, "cuda": 8192}
MATMUL_SIZE_QUICK = 256

ADVERSARY_SOURCES = ("forget_a", "forget_b", "retain")
POOL_ROWS = 256
# Learning rate and weight decay of the floor's AdamW: an adversary learning rate and the
# inner optimizer's default weight decay. The values do not change the cost of a step.
FLOOR_LEARNING_RATE = 1e-3
FLOOR_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: the Llama shape and the vocabulary size of its random tokens."""

    size: LlamaSize
    vocab_size: int


MODEL_SIZES: dict[str, BenchModel] = {
    # For tests and --quick only.
    "tiny": BenchModel(LlamaSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), vocab_size=128),
    # LlamaSize defaults, the model of configs/wkr.yaml, with a vocabulary near the built-in
    # world's word-level tokenizer.
    "2M": BenchModel(LlamaSize(), vocab_size=512),
    "30M": BenchModel(LlamaSize(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376), vocab_size=4096),
}


class _RandomVocabulary:
    """The part of a tokenizer that ``build_llama`` reads: its length and special token ids.

    The ids follow the built-in world's tokenizer (pad, unk, bos, eos).
    """

    pad_token_id = 0
    bos_token_id = 2
    eos_token_id = 3

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


class RandomTokenPool(TokenPool):
    """A ``TokenPool`` of uniformly random token ids at full length, sampled by ``TokenPool.sample``."""

    def __init__(self, rows: int, seq_len: int, vocab_size: int, generator: torch.Generator):
        self.input_ids = torch.randint(vocab_size, (rows, seq_len), generator=generator)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.lengths = self.attention_mask.sum(dim=1)


class RandomTokenDataModule(TARDataModule):
    """``TARDataModule`` whose retain, x_TR and adversary pools contain random tokens.

    Batches still come from ``TARDataModule.train_dataloader``, so the benchmark times the
    product's data path.
    """

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0):
        placeholder = TextSource(path="<random tokens>")
        super().__init__(
            tokenizer="<random tokens>",
            retain=placeholder,
            tamper_resistance=placeholder,
            adversary={name: placeholder for name in ADVERSARY_SOURCES},
            max_length=seq_len,
            retain_batch_size=batch_size,
            tr_batch_size=batch_size,
            seed=seed,
        )
        self.vocab_size = vocab_size

    def setup(self, stage: str) -> None:
        if self.adversary_pools:
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.retain_pool = RandomTokenPool(POOL_ROWS, self.max_length, self.vocab_size, generator)
        self.tr_pool = RandomTokenPool(POOL_ROWS, self.max_length, self.vocab_size, generator)
        self.adversary_pools = {
            name: RandomTokenPool(POOL_ROWS, self.max_length, self.vocab_size, generator) for name in ADVERSARY_SOURCES
        }


def random_batch(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator, device: torch.device) -> dict:
    input_ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}


class MemoryProbe:
    """Peak memory of a block of code.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU:
    the resident set high-water mark (VmHWM). ``reset`` first hands freed heap memory back to
    the kernel with glibc's ``malloc_trim``, so memory that an earlier block freed does not
    count, and then resets VmHWM by writing "5" to /proc/self/clear_refs (Linux). Where either
    is missing, the peak is the process's lifetime peak (``ru_maxrss``) and ``scope`` is
    ``process`` instead of ``block``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.scope = "block"
        self._malloc_trim = None
        if device.type == "cpu":
            try:
                self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self.scope = "process"
            if not self._reset_high_water_mark():
                self.scope = "process"

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_bytes(field: str) -> int | None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.scope == "block":
            gc.collect()
            self._malloc_trim(0)
            self._reset_high_water_mark()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.scope == "block":
            value = self._status_bytes("VmHWM")
            if value is not None:
                return value
        # ru_maxrss is in kilobytes on Linux (bytes on macOS).
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def current(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self._status_bytes("VmRSS")


def make_clock(device: torch.device) -> Callable[[], float]:
    """Return a clock in seconds that first waits for queued CUDA work, so times are not early."""
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


class FloorStep:
    """The passes of one TAR outer step as plain training on real modules with ``torch.optim``.

    ``run`` does ``inner_steps`` adversary steps (forward, next-token loss, backward,
    ``AdamW.step``) and ``tr_passes`` forward and backward passes with the negative-entropy
    loss. The retain pass then runs ``model`` with hidden states and ``base`` without grad,
    and back-propagates the next-token loss plus the representation distance.
    """

    def __init__(self, model, base, inner_steps: int, tr_passes: int, batches: dict, clock: Callable[[], float]):
        self.model = model.train()
        self.base = base.eval().requires_grad_(False)
        self.inner_steps = inner_steps
        self.tr_passes = tr_passes
        self.batches = batches
        self.clock = clock
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=FLOOR_LEARNING_RATE, weight_decay=FLOOR_WEIGHT_DECAY)

    def _forward(self, batch: dict, hidden: bool = False):
        return self.model(**batch, output_hidden_states=hidden, use_cache=False)

    def run(self) -> dict[str, float]:
        """Do one floor step and return the seconds of each pass kind."""
        with torch.enable_grad():
            start = self.clock()
            for k in range(self.inner_steps):
                batch = self.batches["adversary"][k % len(self.batches["adversary"])]
                loss = next_token_loss(self._forward(batch).logits, batch["input_ids"], batch["attention_mask"])
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            adversary_end = self.clock()

            tr_batch = self.batches["tr"]
            for _ in range(self.tr_passes):
                negative_entropy_loss(self._forward(tr_batch).logits, tr_batch["attention_mask"]).backward()
            self.optimizer.zero_grad(set_to_none=True)
            tr_end = self.clock()

            retain_batch = self.batches["retain"]
            outputs = self._forward(retain_batch, hidden=True)
            with torch.no_grad():
                base_hidden = self.base(**retain_batch, output_hidden_states=True, use_cache=False).hidden_states
            mask = retain_batch["attention_mask"]
            lm = next_token_loss(outputs.logits, retain_batch["input_ids"], mask)
            (lm + representation_distance(outputs.hidden_states, base_hidden, mask)).backward()
            self.optimizer.zero_grad(set_to_none=True)
            end = self.clock()
        return {"adversary": adversary_end - start, "tamper_resistance": tr_end - adversary_end, "retain": end - tr_end}


# TARModule's phases of one training step, timed by wrapping the bound methods.
TAR_PHASES = ("_tamper_resistance_gradient", "_retain_loss", "_outer_step")


class InterleavedTimer(Callback):
    """Time each TAR outer step and run one floor step after it, so the two alternate.

    Steps ``[0, warmup)`` are warm-up, each also followed by an untimed floor step. Steps
    ``[warmup, warmup + repeats)`` are timed: the step time (``on_train_batch_start`` to
    ``on_train_batch_end``), the time of each TARModule phase, the Trainer's work between
    steps (logger update, next batch), and the floor step's time per pass kind. The step
    after them measures peak memory of one TAR step and one floor step, untimed, because
    handing freed memory back to the kernel before a block would slow the block down.
    """

    def __init__(self, floor: FloorStep, warmup: int, repeats: int, clock: Callable[[], float], memory: MemoryProbe):
        self.floor = floor
        self.warmup = warmup
        self.memory_step = warmup + repeats
        self.clock = clock
        self.memory = memory
        self.tar_seconds: list[float] = []
        self.tar_phase_seconds: list[dict[str, float]] = []
        self.between_seconds: list[float] = []
        self.floor_phase_seconds: list[dict[str, float]] = []
        self.baseline_bytes: int | None = None
        self.tar_peak_bytes: int | None = None
        self.floor_peak_bytes: int | None = None
        self._phases: dict[str, float] = {}
        self._start = 0.0
        self._floor_end: float | None = None

    def wrap_phases(self, module: TARModule) -> None:
        """Shadow each phase method of ``module`` with a timed call of the original."""
        for name in TAR_PHASES:
            original = getattr(module, name)

            def timed(*args, _original=original, _name=name, **kwargs):
                start = self.clock()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self._phases[_name] = self._phases.get(_name, 0.0) + self.clock() - start

            setattr(module, name, timed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.memory_step:
            self.memory.reset()
            self.baseline_bytes = self.memory.current()
            return
        self._phases = {}
        self._start = self.clock()
        if self._floor_end is not None:
            self.between_seconds.append(self._start - self._floor_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        end = self.clock()
        if batch_idx == self.memory_step:
            self.tar_peak_bytes = self.memory.peak()
            self.memory.reset()
            self.floor.run()
            self.floor_peak_bytes = self.memory.peak()
            return
        if batch_idx < self.warmup:
            self.floor.run()
            return
        self.tar_seconds.append(end - self._start)
        self.tar_phase_seconds.append(dict(self._phases))
        self.floor_phase_seconds.append(self.floor.run())
        self._floor_end = self.clock()


@dataclass
class Settings:
    """Resolved command-line settings shared by every configuration of a run."""

    tr_every: int
    batch_size: int
    seq_len: int
    repeats: int
    warmup: int
    vocab_size: int | None
    device: torch.device
    seed: int


# Warnings that every benchmark run would print: single-process data loading is intended,
# and the pytree deprecation comes from inside Lightning.
_EXPECTED_WARNINGS = (".*does not have many workers.*", ".*`IterableDataset` has `__len__` defined.*", ".*LeafSpec.*")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up messages and the expected warnings."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def save_random_models(name: str, settings: Settings, directory: Path) -> tuple[Path, Path, int, int]:
    """Save a base and a safeguard model of size ``name`` with random weights.

    Returns both paths, the parameter count and the vocabulary size.
    """
    spec = MODEL_SIZES[name]
    size = replace(spec.size, max_position_embeddings=max(spec.size.max_position_embeddings, settings.seq_len))
    vocab_size = settings.vocab_size or spec.vocab_size
    paths = []
    for role, seed in (("base", settings.seed), ("safeguard", settings.seed + 1)):
        model = build_llama(size, _RandomVocabulary(vocab_size), seed=seed)
        path = directory / name / role
        model.save_pretrained(str(path))
        paths.append(path)
    parameters = sum(p.numel() for p in model.parameters())
    return paths[0], paths[1], parameters, vocab_size


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _median_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row.get(key, 0.0) for row in rows) for key in rows[0]} if rows else {}


def measure_configuration(
    name: str, inner_steps: int, models: tuple[Path, Path, int, int], settings: Settings, peak_flops: float, root: Path
) -> dict:
    """Time TAR outer steps and floor steps, interleaved, for one model size and one K."""
    base_path, safeguard_path, parameters, vocab_size = models
    device, batch_size, seq_len = settings.device, settings.batch_size, settings.seq_len
    clock = make_clock(device)
    memory = MemoryProbe(device)

    module = TARModule(
        model_path=str(safeguard_path),
        base_model_path=str(base_path),
        adversaries=[replace(a, batch_size=batch_size) for a in default_adversaries()],
        inner_steps=inner_steps,
        tr_every=settings.tr_every,
    )
    tr_passes = len(tr_step_weights(inner_steps, settings.tr_every, "uniform"))

    generator = torch.Generator().manual_seed(settings.seed)
    batches = {
        "adversary": [random_batch(batch_size, seq_len, vocab_size, generator, device) for _ in range(inner_steps)],
        "tr": random_batch(batch_size, seq_len, vocab_size, generator, device),
        "retain": random_batch(batch_size, seq_len, vocab_size, generator, device),
    }
    floor = FloorStep(
        load_causal_lm(safeguard_path).to(device), load_causal_lm(base_path).to(device), inner_steps, tr_passes, batches, clock
    )
    timer = InterleavedTimer(floor, settings.warmup, settings.repeats, clock, memory)
    timer.wrap_phases(module)

    with _quiet_lightning():
        trainer = L.Trainer(
            max_steps=settings.warmup + settings.repeats + 1,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=str(root / "lightning"),
        )
        trainer.fit(module, datamodule=RandomTokenDataModule(vocab_size, seq_len, batch_size, seed=settings.seed))

    result = summarize_configuration(name, inner_steps, tr_passes, parameters, vocab_size, timer, settings, peak_flops)
    result["memory"]["scope"] = memory.scope
    del trainer, module, floor, timer
    gc.collect()
    return result


def summarize_configuration(
    name: str,
    inner_steps: int,
    tr_passes: int,
    parameters: int,
    vocab_size: int,
    timer: InterleavedTimer,
    settings: Settings,
    peak_flops: float,
) -> dict:
    """Turn one configuration's raw times into medians, ratios, throughput, MFU and memory."""
    tokens = settings.batch_size * settings.seq_len
    # Tokens through the trained weights per outer step; the base model's forward is extra.
    tokens_per_outer_step = (inner_steps + tr_passes + 1) * tokens
    # Estimate: 6 * params * tokens for forward and backward, 2 * params * tokens for the
    # base model's forward. Attention scores are left out, and the embedding matrix is
    # counted although its lookup does no matrix multiply.
    model_flops = 6 * parameters * tokens_per_outer_step + 2 * parameters * tokens

    tar_median = _median(timer.tar_seconds)
    floor_seconds = [sum(phases.values()) for phases in timer.floor_phase_seconds]
    floor_median = _median(floor_seconds)
    # The Trainer's own work per outer step (logger update, next batch) happens between
    # on_train_batch_end and the next on_train_batch_start, outside the step time.
    between_median = _median(timer.between_seconds)
    loop_median = tar_median + between_median if between_median is not None else None

    tar_phases = _median_phases([{k.lstrip("_"): v for k, v in row.items()} for row in timer.tar_phase_seconds])
    tar_phases["other"] = statistics.median(
        step - sum(row.values()) for step, row in zip(timer.tar_seconds, timer.tar_phase_seconds)
    )
    floor_phases = _median_phases(timer.floor_phase_seconds)
    size = MODEL_SIZES[name].size
    spec = {
        "model_size": name,
        "parameters": parameters,
        "vocab_size": vocab_size,
        "hidden_size": size.hidden_size,
        "num_layers": size.num_layers,
        "num_heads": size.num_heads,
        "intermediate_size": size.intermediate_size,
        "inner_steps": inner_steps,
        "tr_every": settings.tr_every,
        "tr_passes": tr_passes,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "tokens_per_outer_step": tokens_per_outer_step,
    }
    ratio = tar_median / floor_median
    meets_ratio = ratio <= TARGET_MAX_RATIO if inner_steps >= TARGET_RATIO_FROM_INNER_STEPS else None
    return {
        **spec,
        "tar": {
            "median_s": tar_median,
            "seconds": timer.tar_seconds,
            "phases_median_s": tar_phases,
            "between_steps_median_s": between_median,
            "between_steps_seconds": timer.between_seconds,
            "loop_median_s": loop_median,
        },
        "floor": {"median_s": floor_median, "seconds": floor_seconds, "phases_median_s": floor_phases},
        "ratio": ratio,
        "loop_ratio": loop_median / floor_median if loop_median is not None else None,
        "meets_ratio_target": meets_ratio,
        "tokens_per_second": {
            "tar_outer_step": tokens_per_outer_step / tar_median,
            "floor_outer_step": tokens_per_outer_step / floor_median,
            "floor_adversary_step": inner_steps * tokens / floor_phases["adversary"],
            "floor_tamper_resistance_pass": tr_passes * tokens / floor_phases["tamper_resistance"],
            "floor_retain_pass": tokens / floor_phases["retain"],
            "tar_inner_loop": (inner_steps + tr_passes) * tokens / tar_phases["tamper_resistance_gradient"],
        },
        "model_flops_per_outer_step": model_flops,
        "mfu": {"tar": model_flops / tar_median / peak_flops, "floor": model_flops / floor_median / peak_flops},
        "memory": {
            "baseline_bytes": timer.baseline_bytes,
            "tar_peak_bytes": timer.tar_peak_bytes,
            "floor_peak_bytes": timer.floor_peak_bytes,
        },
    }


def linear_fit(inner_steps: list[int], seconds: list[float]) -> dict:
    """Fit seconds = intercept + slope * K; the deviation is max |measured - fit| / fit.

    The deviation is ``None`` with fewer than three values of K, where a line fits exactly.
    """
    slope, intercept = np.polyfit(np.asarray(inner_steps, dtype=float), np.asarray(seconds, dtype=float), 1)
    fitted = intercept + slope * np.asarray(inner_steps, dtype=float)
    deviation = float(np.max(np.abs(np.asarray(seconds) - fitted) / fitted)) if len(inner_steps) >= 3 else None
    return {"slope_s_per_inner_step": float(slope), "intercept_s": float(intercept), "max_relative_deviation": deviation}


def summarize_scaling(results: list[dict]) -> dict:
    """Time per outer step and ratio over K, with linear fits, for each model size with two or more K."""
    scaling = {}
    for name in dict.fromkeys(r["model_size"] for r in results):
        rows = sorted((r for r in results if r["model_size"] == name), key=lambda r: r["inner_steps"])
        if len(rows) < 2:
            continue
        ks = [r["inner_steps"] for r in rows]
        tar_fit = linear_fit(ks, [r["tar"]["median_s"] for r in rows])
        deviation = tar_fit["max_relative_deviation"]
        scaling[name] = {
            "inner_steps": ks,
            "tar_median_s": [r["tar"]["median_s"] for r in rows],
            "floor_median_s": [r["floor"]["median_s"] for r in rows],
            "ratio": [r["ratio"] for r in rows],
            "tar_fit": tar_fit,
            "floor_fit": linear_fit(ks, [r["floor"]["median_s"] for r in rows]),
            "meets_linearity_target": deviation <= TARGET_MAX_LINEARITY_DEVIATION if deviation is not None else None,
        }
    return scaling


def measure_matmul_peak(n: int, repeats: int, device: torch.device) -> float:
    """Return the best float32 FLOP/s of an n x n matrix multiply, the peak that MFU is measured against."""
    clock = make_clock(device)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b, out=out)
        best = min(best, clock() - start)
    return 2 * n**3 / best


def warn_if_cpu_busy(device: torch.device, load_average: tuple[float, float, float] | None) -> None:
    """Log a warning when other processes already keep CPU cores busy on a CPU run.

    On a 2-core machine with one core busy, 2 torch threads slowed the 2M model's outer step
    at K=8 from 0.9 s (1 thread) to 16 s, and made the ratio meaningless.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type != "cpu" or load_average is None or not cpus:
        return
    busy = round(load_average[0])
    threads = torch.get_num_threads()
    if threads > 1 and busy >= 1 and busy + threads > cpus:
        log.warning(
            "load average %.1f on %d CPUs: other processes are busy, and %d torch threads will compete with them; "
            "timings can be many times slower and noisy. Pass --threads %d or fewer for stable numbers",
            load_average[0],
            cpus,
            threads,
            max(cpus - busy, 1),
        )


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value}")
    return value


def _default_help(key: str) -> str:
    normal, quick = SETTING_DEFAULTS[key]
    return f"(default: {normal}; {quick} with --quick)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tar_lightning.bench",
        description=(
            "Time the real TAR outer step (TARModule.training_step in a Lightning Trainer) against its floor: "
            "the same forward and backward passes as plain training with torch.optim.AdamW, interleaved in one process. "
            "Models have random weights and batches contain random token ids."
        ),
    )

    sizes = ", ".join(
        f"{name} (hidden {m.size.hidden_size}, {m.size.num_layers} layers, {m.size.num_heads} heads, "
        f"MLP {m.size.intermediate_size}, vocabulary {m.vocab_size})"
        for name, m in MODEL_SIZES.items()
    )
    default_plan = "; ".join(f"{name} at K = {' '.join(map(str, ks))}" for name, ks in DEFAULT_PLAN)
    parser.add_argument(
        "--model-size",
        nargs="+",
        choices=list(MODEL_SIZES),
        metavar="SIZE",
        help=(
            f"model sizes to measure: {sizes}. Without this and --inner-steps the default plan runs: {default_plan}. "
            f"With only --inner-steps: {' and '.join(name for name, _ in DEFAULT_PLAN)} ({QUICK_PLAN[0][0]} with --quick)"
        ),
    )
    parser.add_argument(
        "--inner-steps",
        nargs="+",
        type=_positive_int,
        metavar="K",
        help=(
            "values of K, inner (adversary) steps per outer step, measured for every model size "
            f"(default: {' '.join(map(str, DEFAULT_INNER_STEPS))}; {' '.join(map(str, QUICK_PLAN[0][1]))} with --quick)"
        ),
    )
    parser.add_argument(
        "--tr-every",
        type=_positive_int,
        help=f"take the tamper-resistance loss every this many inner steps {_default_help('tr_every')}",
    )

    parser.add_argument("--batch-size", type=_positive_int, help=f"sequences per batch of every pass {_default_help('batch_size')}")
    parser.add_argument("--seq-len", type=_positive_int, help=f"tokens per sequence, at least 2 {_default_help('seq_len')}")
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        help=f"timed TAR outer steps per configuration, each followed by one floor step {_default_help('repeats')}",
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, help=f"untimed TAR and floor steps before timing starts {_default_help('warmup')}"
    )
    parser.add_argument("--vocab-size", type=_positive_int, help="vocabulary size for every model size (default: each size's own)")

    parser.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device to run on; auto picks CUDA when available (default: auto)")
    parser.add_argument(
        "--matmul-size",
        type=_positive_int,
        help=(
            "n of the n x n float32 matrix multiply whose speed is the MFU peak "
            f"(default: {MATMUL_SIZES['cpu']} on CPU, {MATMUL_SIZES['cuda']} on CUDA; {MATMUL_SIZE_QUICK} with --quick)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of model weights and random tokens (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("checkpoints/bench/bench.json"),
        help="JSON file the results are written to (default: checkpoints/bench/bench.json)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds-long smoke run with the --quick defaults above; options given explicitly still apply",
    )
    return parser


def resolve_plan(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """Return the (model size, K values) pairs to measure."""
    if args.model_size is None and args.inner_steps is None:
        return QUICK_PLAN if args.quick else DEFAULT_PLAN
    default_ks = QUICK_PLAN[0][1] if args.quick else DEFAULT_INNER_STEPS
    default_sizes = [QUICK_PLAN[0][0]] if args.quick else [name for name, _ in DEFAULT_PLAN]
    ks = sorted(set(args.inner_steps or default_ks))
    return [(name, ks) for name in dict.fromkeys(args.model_size or default_sizes)]


def _setting(args: argparse.Namespace, key: str) -> int:
    value = getattr(args, key)
    if value is not None:
        return value
    normal, quick = SETTING_DEFAULTS[key]
    return quick if args.quick else normal


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser, plan: list[tuple[str, list[int]]]) -> Settings:
    """Apply the defaults (the --quick ones with --quick) and reject invalid combinations."""
    tr_every = _setting(args, "tr_every")
    smallest_k = min(k for _, ks in plan for k in ks)
    if tr_every > smallest_k:
        parser.error(f"--tr-every {tr_every} is larger than the smallest --inner-steps value {smallest_k}; lower --tr-every")
    seq_len = _setting(args, "seq_len")
    if seq_len < 2:
        parser.error(f"--seq-len must be at least 2 for a next-token loss, got {seq_len}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False; use --device cpu")
    # NOTE: only the CPU path has been run; the CUDA path (synchronising clock, CUDA memory
    # statistics, "gpu" Trainer) is untested.
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    return Settings(
        tr_every=tr_every,
        batch_size=_setting(args, "batch_size"),
        seq_len=seq_len,
        repeats=_setting(args, "repeats"),
        warmup=_setting(args, "warmup"),
        vocab_size=args.vocab_size,
        device=device,
        seed=args.seed,
    )


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_report(report: dict) -> str:
    """Readable tables of a finished run."""
    lines = [
        f"TAR outer step vs floor, {report['machine']['device']}, torch {report['machine']['torch']}, "
        f"{report['machine']['torch_threads']} threads, matmul peak {report['matmul_peak_flops'] / 1e9:.1f} GFLOP/s",
        "",
        f"{'model':>5} {'params':>11} {'K':>3} {'TR':>3} {'TAR s':>8} {'floor s':>8} {'ratio':>6} {'loop':>6} "
        f"{'MFU TAR':>8} {'MFU flr':>8} {'MiB base':>8} {'MiB TAR':>8} {'MiB flr':>8}",
    ]
    for r in report["results"]:
        loop = "-" if r["loop_ratio"] is None else f"{r['loop_ratio']:.3f}"
        lines.append(
            f"{r['model_size']:>5} {r['parameters']:>11,} {r['inner_steps']:>3} {r['tr_passes']:>3} "
            f"{r['tar']['median_s']:>8.3f} {r['floor']['median_s']:>8.3f} {r['ratio']:>6.3f} {loop:>6} "
            f"{r['mfu']['tar']:>8.1%} {r['mfu']['floor']:>8.1%} "
            f"{_mib(r['memory']['baseline_bytes']):>8} {_mib(r['memory']['tar_peak_bytes']):>8} "
            f"{_mib(r['memory']['floor_peak_bytes']):>8}"
        )
    lines += ["", "Median seconds per phase (TAR: inner loop, retain forward, outer backward and update, other; floor: adversary, TR, retain)"]
    for r in report["results"]:
        t, f = r["tar"]["phases_median_s"], r["floor"]["phases_median_s"]
        lines.append(
            f"{r['model_size']:>5} K={r['inner_steps']:<3} TAR {t['tamper_resistance_gradient']:.3f} {t['retain_loss']:.3f} "
            f"{t['outer_step']:.3f} {t['other']:.3f} | floor {f['adversary']:.3f} {f['tamper_resistance']:.3f} {f['retain']:.3f}"
        )
    lines += ["", "Tokens per second (floor per pass kind; TAR per outer step)"]
    for r in report["results"]:
        tps = r["tokens_per_second"]
        lines.append(
            f"{r['model_size']:>5} K={r['inner_steps']:<3} adversary {tps['floor_adversary_step']:,.0f}  "
            f"TR {tps['floor_tamper_resistance_pass']:,.0f}  retain {tps['floor_retain_pass']:,.0f}  "
            f"TAR step {tps['tar_outer_step']:,.0f}  floor step {tps['floor_outer_step']:,.0f}"
        )
    for name, s in report["scaling"].items():
        fit = s["tar_fit"]
        deviation = "-" if fit["max_relative_deviation"] is None else f"{fit['max_relative_deviation']:.1%}"
        lines += [
            "",
            f"Scaling over K, {name}: TAR s = {fit['intercept_s']:.3f} + {fit['slope_s_per_inner_step']:.4f} * K, "
            f"max deviation from the line {deviation}",
            "  K:     " + " ".join(f"{k:>7}" for k in s["inner_steps"]),
            "  TAR s: " + " ".join(f"{v:>7.3f}" for v in s["tar_median_s"]),
            "  ratio: " + " ".join(f"{v:>7.3f}" for v in s["ratio"]),
        ]
    lines += [
        "",
        f"Targets: ratio <= {TARGET_MAX_RATIO} at K >= {TARGET_RATIO_FROM_INNER_STEPS}; "
        f"TAR time linear in K within {TARGET_MAX_LINEARITY_DEVIATION:.0%}. "
        "MFU is an estimate (6 * params * tokens per forward and backward).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables, write its JSON and return the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = resolve_plan(args)
    settings = resolve_settings(args, parser, plan)
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run_plan(args, plan, settings, argv)
    finally:
        torch.set_num_threads(threads)
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    return report


def run_plan(args: argparse.Namespace, plan: list[tuple[str, list[int]]], settings: Settings, argv: list[str]) -> dict:
    """Measure the matmul peak and every configuration of ``plan``; return the report."""
    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    warn_if_cpu_busy(settings.device, load_start)
    matmul_size = args.matmul_size
    if matmul_size is None:
        matmul_size = MATMUL_SIZE_QUICK if args.quick else MATMUL_SIZES[settings.device.type]
    peak_flops = measure_matmul_peak(matmul_size, repeats=5, device=settings.device)
    log.info("matmul peak %.1f GFLOP/s (n=%d)", peak_flops / 1e9, matmul_size)

    results = []
    with tempfile.TemporaryDirectory(prefix="tar-bench-") as workdir:
        root = Path(workdir)
        for name, ks in plan:
            models = save_random_models(name, settings, root)
            for k in ks:
                log.info("measuring %s (%d parameters) at K=%d", name, models[2], k)
                results.append(measure_configuration(name, k, models, settings, peak_flops, root))

    report = {
        "command": shlex.join(["python", "-m", "tar_lightning.bench", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": {**machine_info(settings.device), "load_average_start": load_start,
                    "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {
            "tr_every": settings.tr_every,
            "batch_size": settings.batch_size,
            "seq_len": settings.seq_len,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "data": "uniformly random token ids, full length, no padding",
            "weights": "random (LlamaForCausalLM built from a config)",
            "floor_optimizer": "torch.optim.AdamW with torch's default implementation choice",
        },
        "matmul_peak_flops": peak_flops,
        "matmul_size": matmul_size,
        "targets": {
            "max_ratio": TARGET_MAX_RATIO,
            "ratio_from_inner_steps": TARGET_RATIO_FROM_INNER_STEPS,
            "max_linearity_deviation": TARGET_MAX_LINEARITY_DEVIATION,
        },
        "results": results,
        "scaling": summarize_scaling(results),
    }
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    main()
