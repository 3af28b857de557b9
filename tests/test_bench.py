"""The TAR benchmark's plan, its argument checks and a --quick run on the tiny model."""

import json

import pytest
import torch

from tar_lightning.bench import cli as bench
from tar_lightning.bench.workload import MODEL_SIZES, _RandomVocabulary
from tar_lightning.models import build_llama

RESULT_KEYS = {
    "model_size",
    "parameters",
    "vocab_size",
    "inner_steps",
    "tr_every",
    "tr_passes",
    "batch_size",
    "seq_len",
    "tokens_per_outer_step",
    "tar",
    "floor",
    "ratio",
    "loop_ratio",
    "meets_ratio_target",
    "tokens_per_second",
    "model_flops_per_outer_step",
    "mfu",
    "memory",
}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # One thread keeps the run short even when another process keeps a core busy.
    argv = ["--quick", "--model-size", "tiny", "--inner-steps", "3", "1", "2", "--tr-every", "1", "--repeats", "2"]
    bench.main([*argv, "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


def test_plan_defaults():
    parser = bench.build_parser()
    assert bench.resolve_plan(parser.parse_args([])) == [("2M", [4, 8, 16, 32]), ("30M", [8])]
    assert bench.resolve_plan(parser.parse_args(["--quick"])) == [("tiny", [2, 4])]


def test_plan_from_flags():
    parser = bench.build_parser()
    assert bench.resolve_plan(parser.parse_args(["--model-size", "30M", "--inner-steps", "16"])) == [("30M", [16])]
    assert bench.resolve_plan(parser.parse_args(["--inner-steps", "8", "4"])) == [("2M", [4, 8]), ("30M", [4, 8])]


def test_tr_every_above_k_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        bench.main(["--quick", "--inner-steps", "2", "--tr-every", "3", "--out", str(tmp_path / "b.json")])
    assert error.value.code == 2
    assert "--tr-every 3" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_model_sizes_match_names():
    counts = {}
    for name, spec in MODEL_SIZES.items():
        model = build_llama(spec.size, _RandomVocabulary(spec.vocab_size))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert 1.5e6 < counts["2M"] < 2.5e6
    assert 27e6 < counts["30M"] < 33e6


def test_quick_report_top_level(quick_report):
    expected = {"command", "date", "wall_s", "machine", "settings", "matmul_peak_flops", "targets", "results", "scaling"}
    assert expected <= set(quick_report)
    assert quick_report["matmul_peak_flops"] > 0
    assert quick_report["machine"]["torch"] == torch.__version__
    assert quick_report["machine"]["torch_threads"] == 1
    assert "--quick" in quick_report["command"]


def test_quick_report_results(quick_report):
    results = quick_report["results"]
    assert [r["inner_steps"] for r in results] == [1, 2, 3]
    for r in results:
        assert RESULT_KEYS <= set(r)
        assert r["model_size"] == "tiny"
        assert r["tr_passes"] == r["inner_steps"]
        assert r["ratio"] > 0
        assert r["loop_ratio"] >= r["ratio"]
        assert len(r["tar"]["seconds"]) == 2
        assert len(r["floor"]["seconds"]) == 2
        assert all(t > 0 for t in r["tar"]["seconds"] + r["floor"]["seconds"])
        assert set(r["tar"]["phases_median_s"]) == {"tamper_resistance_gradient", "retain_loss", "outer_step", "other"}
        assert set(r["floor"]["phases_median_s"]) == {"adversary", "tamper_resistance", "retain"}
        assert all(v > 0 for v in r["tokens_per_second"].values())
        assert r["mfu"]["tar"] > 0
        assert r["mfu"]["floor"] > 0
        assert r["memory"]["tar_peak_bytes"] > 0
        assert r["memory"]["floor_peak_bytes"] > 0
        # Below K = 8 the ratio target does not apply.
        assert r["meets_ratio_target"] is None


def test_quick_report_scaling(quick_report):
    tiny = quick_report["scaling"]["tiny"]
    assert tiny["inner_steps"] == [1, 2, 3]
    assert len(tiny["tar_median_s"]) == 3
    assert tiny["tar_fit"]["max_relative_deviation"] >= 0
    assert isinstance(tiny["meets_linearity_target"], bool)


def test_main_restores_thread_count(tmp_path):
    before = torch.get_num_threads()
    requested = 1 if before != 1 else 2
    argv = ["--quick", "--inner-steps", "1", "--tr-every", "1", "--repeats", "1", "--warmup", "0"]
    report = bench.main([*argv, "--threads", str(requested), "--out", str(tmp_path / "bench.json")])
    assert report["machine"]["torch_threads"] == requested
    assert torch.get_num_threads() == before
