"""Tests of the red-team: the default suite, config checks, a tiny run end to end and its report."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tar_lightning.cli import main, redteam_parser
from tar_lightning.data.sources import QuestionSource, TextSource
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation import redteam as redteam_module
from tar_lightning.evaluation.attacks import AttackConfig
from tar_lightning.evaluation.redteam import QuickPreset, RedteamConfig, run_redteam
from tar_lightning.evaluation.redteam_report import render_redteam_markdown, summarize
from tar_lightning.evaluation.suite import QUICK_ATTACKS, default_suite
from tar_lightning.finetune import lr_factor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WKR_CORPORA = {"forget_a", "forget_b", "forget_ood", "adjacent", "retain"}


def test_default_suite_covers_every_axis():
    suite = default_suite()
    names = [a.name for a in suite]

    assert len(suite) >= 16
    assert len(set(names)) == len(names)
    for attack in suite:
        assert attack.validate(attack.name, WKR_CORPORA) == [], attack.name
    assert {a.optimizer for a in suite} == {"adamw", "adam", "sgd_momentum", "sgd_nesterov", "adagrad", "adadelta", "schedule_free_adamw"}
    assert {a.schedule for a in suite} == {"constant", "linear_warmup", "warmup_cosine", "sgdr"}
    assert {a.data for a in suite} >= WKR_CORPORA
    assert any(a.retain_fraction > 0 for a in suite)
    assert any(a.benign_share > 0 for a in suite)
    assert any(a.lora is not None and (a.lora.rank, a.lora.alpha, a.lora.dropout) == (16, 32.0, 0.05) for a in suite)
    assert any(a.loop == "hf_trainer" and a.warmup_steps == 100 and a.schedule == "warmup_cosine" for a in suite)
    # Long attacks run many times the default training horizon of 16 inner steps.
    assert max(a.steps for a in suite) >= 32 * 16
    assert {a.held_out for a in suite} == {True, False}
    assert set(QUICK_ATTACKS) <= set(names)


def _config(tiny_run: Path, out: Path, **changes) -> RedteamConfig:
    world = tiny_run / "world"
    attacks = [
        AttackConfig(name="adamw_forget_a", steps=4, batch_size=4, learning_rate=1e-2, held_out=False),
        AttackConfig(name="sgd_mixed", optimizer="sgd_momentum", steps=6, batch_size=4, learning_rate=5e-2, benign_share=0.5),
    ]
    config = RedteamConfig(
        checkpoints=[str(tiny_run / "model_a"), str(tiny_run / "model_b")],
        output_dir=str(out),
        corpora={"forget_a": TextSource(str(world / "adversary_forget_a.jsonl")), "retain": TextSource(str(world / "adversary_retain.jsonl"))},
        questions={
            "forget": QuestionSource(str(world / "forget_eval.jsonl")),
            "retain": QuestionSource(str(world / "retain_eval.jsonl")),
            "adversary": QuestionSource(str(world / "adversary_eval.jsonl")),
        },
        attacks=attacks,
        seeds=[0, 1],
        curve_steps=[2, 4, 100],
        max_length=32,
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("redteam")
    training_report = out / "training_report.json"
    training_report.write_text(json.dumps({"models": {"model_a": {"forget_acc": 0.3, "post_attack": {"old": {"forget_acc": 0.5}}}}}))
    config = _config(tiny_run, out / "redteam", extend_report=str(training_report))
    return config, run_redteam(config), training_report


def test_report_has_every_model_attack_and_seed(finished):
    config, report, _ = finished

    assert set(report["models"]) == {"model_a", "model_b"}
    for entry in report["models"].values():
        assert set(entry["attacks"]) == {"adamw_forget_a", "sgd_mixed"}
        for attack in config.attacks:
            summary = entry["attacks"][attack.name]
            assert [run["seed"] for run in summary["per_seed"]] == [0, 1]
            for run in summary["per_seed"]:
                assert set(run) >= {"forget_acc", "retain_acc", "adversary_acc", "final_loss", "steps", "curve"}
                assert run["steps"] == attack.steps
            values = [run["forget_acc"] for run in summary["per_seed"]]
            assert summary["forget_acc"]["mean"] == pytest.approx(sum(values) / 2)
            assert summary["forget_acc"]["min"] == min(values)
            assert summary["forget_acc"]["max"] == max(values)
            assert summary["held_out"] == attack.held_out


def test_learning_curve_spans_whole_attack(finished):
    _, report, _ = finished
    entry = report["models"]["model_a"]

    # Curve steps beyond an attack's length are skipped; its last step is always scored.
    assert entry["attacks"]["adamw_forget_a"]["curve"]["steps"] == [0, 2, 4]
    assert entry["attacks"]["sgd_mixed"]["curve"]["steps"] == [0, 2, 4, 6]
    curve = entry["attacks"]["sgd_mixed"]["curve"]
    assert curve["mean"][0] == entry["before"]["forget_acc"]
    assert curve["mean"][-1] == pytest.approx(entry["attacks"]["sgd_mixed"]["forget_acc"]["mean"])


def test_outputs_written_and_training_report_extended(finished):
    config, report, training_report = finished
    out = Path(config.output_dir)

    for name in ("report.json", "report.md", "curves.png", "attacks.png", "runs.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == report
    assert list((out / "tensorboard" / "model_a" / "sgd_mixed" / "seed1").glob("events.out.tfevents.*"))
    extended = json.loads(training_report.read_text())["models"]["model_a"]
    assert extended["post_attack"]["old"] == {"forget_acc": 0.5}
    assert extended["post_attack"]["redteam/sgd_mixed"]["forget_acc"] == report["models"]["model_a"]["attacks"]["sgd_mixed"]["forget_acc"]["mean"]
    assert extended["redteam"]["worst_attack"] == report["models"]["model_a"]["worst_attack"]


def test_second_run_reuses_cached_results(finished, monkeypatch):
    config, report, _ = finished

    def fail(*args, **kwargs):
        raise AssertionError("a cached run was attacked again")

    monkeypatch.setattr(redteam_module, "run_attack", fail)
    assert run_redteam(replace(config, extend_report=None)) == report


def test_changed_attack_runs_again(finished, tmp_path, monkeypatch):
    config, _, _ = finished
    calls = []
    original = redteam_module.run_attack

    def counting(path, attack, *args, **kwargs):
        calls.append((Path(path).name, attack.name))
        return original(path, attack, *args, **kwargs)

    monkeypatch.setattr(redteam_module, "run_attack", counting)
    changed = [config.attacks[0], replace(config.attacks[1], learning_rate=1e-2)]
    run_redteam(replace(config, attacks=changed, extend_report=None))

    assert sorted(set(calls)) == [("model_a", "sgd_mixed"), ("model_b", "sgd_mixed")]
    assert len(calls) == 4


def _summary_results(forget: dict[str, list[float]], retain: dict[str, list[float]]) -> dict:
    runs = {
        name: [
            {"forget_acc": f, "retain_acc": r, "adversary_acc": 0.9, "final_loss": 1.0, "steps": 8, "curve": {"8": f}}
            for f, r in zip(forget[name], retain[name])
        ]
        for name in forget
    }
    return {"m": {"path": "m", "before": {"forget_acc": 0.3, "retain_acc": 0.9}, "attacks": runs}}


def test_summary_ranks_worst_attack_and_flags_collapse():
    attacks = [AttackConfig(name="mild", held_out=False), AttackConfig(name="strong"), AttackConfig(name="destructive")]
    results = _summary_results(
        forget={"mild": [0.3, 0.4], "strong": [0.5, 0.7], "destructive": [0.25, 0.2]},
        retain={"mild": [0.9, 0.9], "strong": [0.8, 0.9], "destructive": [0.3, 0.26]},
    )
    config = RedteamConfig(seeds=[0, 1])

    report = summarize(results, attacks, [0, 1], config)
    entry = report["models"]["m"]

    assert entry["worst_attack"] == {"attack": "strong", "value": pytest.approx(0.6)}
    assert entry["worst_run"] == {"attack": "strong", "seed": 1, "value": 0.7}
    assert entry["in_distribution_mean"] == pytest.approx(0.35)
    assert entry["held_out_mean"] == pytest.approx((0.6 + 0.225) / 2)
    assert entry["collapsed_attacks"] == ["destructive"]
    markdown = render_redteam_markdown(report, attacks)
    rows = [line for line in markdown.splitlines() if line.startswith(("| strong", "| mild", "| destructive"))]
    assert [row.split(" | ")[0] for row in rows] == ["| strong", "| mild", "| destructive"]
    assert "COLLAPSED" in rows[2]
    assert "COLLAPSED" not in rows[0]


def test_quick_plan_shortens_attacks_and_scales_warmup():
    attacks = [
        AttackConfig(name="long", steps=256, schedule="warmup_cosine", warmup_steps=100),
        AttackConfig(name="cycles", steps=128, schedule="sgdr", warmup_steps=8, restart_steps=32),
        AttackConfig(name="other", steps=16),
    ]
    config = RedteamConfig(attacks=attacks, quick=True, quick_preset=QuickPreset(attacks=["long", "cycles"], seeds=[5], max_steps=64))

    planned, seeds = config.plan()

    assert seeds == [5]
    assert [(a.name, a.steps, a.warmup_steps, a.restart_steps) for a in planned] == [("long", 64, 25, 0), ("cycles", 64, 4, 16)]
    # The shortened schedule has the same shape: warmup ends a quarter, then a cosine to zero.
    assert lr_factor(24, planned[0]) == pytest.approx(1.0)
    assert lr_factor(64, planned[0]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"questions": {}}, "redteam.questions must include 'forget'"),
        ({"seeds": []}, "redteam.seeds must list at least one seed"),
        ({"quick": True, "quick_preset": QuickPreset(attacks=["nope"])}, "['nope'], which are not in redteam.attacks"),
        ({"attacks": [AttackConfig(name="a", data="web")]}, "redteam.attacks[0] uses data 'web'"),
    ],
)
def test_validate_names_each_problem(tiny_run, tmp_path, changes, expected):
    problems = _config(tiny_run, tmp_path, **changes).validate()

    assert any(expected in problem for problem in problems), problems


def test_duplicate_model_folder_names_rejected(tiny_run, tmp_path):
    config = _config(tiny_run, tmp_path, checkpoints=[str(tiny_run / "model_a"), str(tiny_run / "model_a") + "/"])

    assert any("folder names must be unique" in problem for problem in config.validate())


def test_missing_model_rejected_before_any_work(tiny_run, tmp_path):
    config = _config(tiny_run, tmp_path / "out", checkpoints=[str(tmp_path / "nowhere" / "tar")])

    with pytest.raises(ConfigError, match="nowhere/tar does not exist; train it first"):
        run_redteam(config)
    assert not (tmp_path / "out").exists()


def test_command_line_reports_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["redteam", "--config", str(CONFIGS / "redteam" / "wkr.yaml"), "--run_dir", str(tmp_path), "--redteam.seeds", "[]"])

    assert exit_info.value.code == 2
    assert "redteam.seeds must list at least one seed" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((CONFIGS / "redteam").glob("*.yaml")), ids=lambda p: p.name)
def test_redteam_configs_parse_with_run_dir_override(path, tmp_path):
    parser = redteam_parser()

    parsed = parser.parse_args(["--config", str(path), "--run_dir", str(tmp_path), "--redteam.quick", "true"])
    config = parser.instantiate(parsed).redteam

    assert config.quick
    assert all(p.startswith(str(tmp_path)) for p in config.checkpoints)
    assert config.output_dir == f"{tmp_path}/redteam"
    assert config.attacks
    # Nothing is trained under tmp_path, so the missing models are the only problems.
    problems = config.validate()
    assert len(problems) == len(config.checkpoints)
    assert all("does not exist; train it first" in problem for problem in problems)


@pytest.fixture(scope="module")
def tiny_hrr_run(tmp_path_factory):
    from tar_lightning.data.instructions import InstructionWorldConfig, instruction_extender
    from tar_lightning.data.world import WorldConfig, generate_world
    from tar_lightning.models import LlamaSize, build_llama, load_tokenizer, save_model

    root = tmp_path_factory.mktemp("hrr_run")
    world = WorldConfig(seed=2, eval_organisms=2, adversary_organisms=2, tamper_resistance_organisms=2, eval_cities=6, extra_cities=0)
    instructions = InstructionWorldConfig(instruct_compounds=3, preference_compounds=2, adversary_compounds=3, eval_compounds=3, benign_eval_cities=2)
    generate_world(world, root / "world", instruction_extender(instructions))
    tokenizer = load_tokenizer(root / "world" / "tokenizer")
    save_model(build_llama(LlamaSize(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tokenizer), tokenizer, root / "tar")
    return root


def test_hrr_redteam_ranks_by_attack_success(tiny_hrr_run, tmp_path):
    parser = redteam_parser()
    attack = "[{name: sft, optimizer: adamw, learning_rate: 0.01, steps: 3, batch_size: 4, data: harmful}]"
    args = ["--config", str(CONFIGS / "redteam" / "hrr.yaml"), "--run_dir", str(tiny_hrr_run), "--redteam.attacks", attack]
    args += ["--redteam.seeds", "[0, 1]", "--redteam.checkpoints", f"[{tiny_hrr_run / 'tar'}]", "--redteam.output_dir", str(tmp_path)]
    args += ["--redteam.refusal.max_new_tokens", "4", "--redteam.curve_steps", "[2]"]
    config = parser.instantiate(parser.parse_args(args)).redteam

    report = run_redteam(config)

    entry = report["models"]["tar"]
    assert report["metrics"]["harm"] == "attack_success"
    for key in ("refusal_rate", "attack_success", "preference_win_rate", "benign_acc"):
        assert 0.0 <= entry["before"][key] <= 1.0, key
    summary = entry["attacks"]["sft"]
    assert summary["attack_success"]["mean"] == pytest.approx(1.0 - summary["refusal_rate"]["mean"])
    assert summary["curve"]["steps"] == [0, 2, 3]
    assert entry["worst_attack"]["attack"] == "sft"
    assert "attack success after" in (tmp_path / "report.md").read_text()


def test_hrr_redteam_needs_refusal_data(tiny_run, tmp_path):
    config = _config(tiny_run, tmp_path, objective="hrr")

    assert any("redteam.refusal must name the held-out harmful" in problem for problem in config.validate())


def test_missing_relative_model_is_not_looked_up_online(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    config = RedteamConfig(checkpoints=["checkpoints/nope", "someone/model"])

    problems = [p for p in config.validate() if "redteam.checkpoints" in p]

    # checkpoints/ exists here, so checkpoints/nope is a missing local model; someone/model may be a hub name.
    assert problems == ["redteam.checkpoints: checkpoints/nope does not exist; train it first (make train) or fix the path"]
