"""Workload of the benchmark: random models and data, the floor step, and the interleaved timer."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from tar_lightning.adversaries import default_adversaries
from tar_lightning.bench.summary import TARGET_MAX_RATIO, TARGET_RATIO_FROM_INNER_STEPS
from tar_lightning.data.datamodule import TARDataModule
from tar_lightning.data.sources import TextSource, TokenPool
from tar_lightning.inner_loop import tr_step_weights
from tar_lightning.losses import (
    negative_entropy_loss,
    next_token_loss,
    representation_distance,
)
from tar_lightning.models import LlamaSize, build_llama, load_causal_lm
from tar_lightning.module import TARModule

log = logging.getLogger(__name__)

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
