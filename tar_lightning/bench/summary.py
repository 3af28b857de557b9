"""Summaries of benchmark measurements: ratios, linear fits, machine facts and the printed table."""

from __future__ import annotations

import logging
import os
import platform

import lightning as L
import numpy as np
import torch
import transformers

log = logging.getLogger(__name__)

# Pass/fail lines reported next to the measurements; they never change what is measured.
TARGET_MAX_RATIO = 1.10
TARGET_RATIO_FROM_INNER_STEPS = 8
TARGET_MAX_LINEARITY_DEVIATION = 0.10


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
