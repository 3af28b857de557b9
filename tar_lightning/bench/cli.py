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
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from tar_lightning.bench.summary import (  # noqa: E402
    TARGET_MAX_LINEARITY_DEVIATION,
    TARGET_MAX_RATIO,
    TARGET_RATIO_FROM_INNER_STEPS,
    format_report,
    machine_info,
    summarize_scaling,
    warn_if_cpu_busy,
)
from tar_lightning.bench.workload import (  # noqa: E402
    MODEL_SIZES,
    Settings,
    measure_configuration,
    measure_matmul_peak,
    save_random_models,
)

log = logging.getLogger(__name__)

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
