"""Config parsing through the real LightningCLI."""

from pathlib import Path

import pytest

from tar_lightning.cli import make_cli, parse_ablation
from tar_lightning.module import TARModule
from tar_lightning.pipeline import PipelineConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAIN_CONFIG = CONFIGS / "wkr.yaml"


def _parse(*args: str):
    return make_cli(["--config", str(MAIN_CONFIG), *args], run=False)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(path: Path):
    # Presets overlay the main config, so each is parsed on top of it.
    cli = make_cli(["--config", str(MAIN_CONFIG), "--config", str(path)], run=False)
    assert isinstance(cli.model, TARModule)
    assert isinstance(cli.config_init["pipeline"], PipelineConfig)
    assert "${" not in str(cli.config["model"]["model_path"])


def test_run_dir_override_propagates():
    cli = _parse("--pipeline.run_dir", "/tmp/elsewhere")
    assert cli.config["model"]["model_path"] == "/tmp/elsewhere/safeguard"
    assert cli.config["model"]["base_model_path"] == "/tmp/elsewhere/base"
    assert cli.config["data"]["tokenizer"] == "/tmp/elsewhere/safeguard"
    assert cli.config["data"]["adversary"]["forget_a"].path == "/tmp/elsewhere/world/adversary_forget_a.jsonl"
    assert cli.trainer.default_root_dir == "/tmp/elsewhere"


def test_model_override_reaches_module():
    cli = _parse("--model.inner_steps", "8", "--model.tr_every", "2")
    assert cli.model.hparams.inner_steps == 8
    assert sorted(cli.model.tr_weights[8]) == [1, 3, 5, 7]


def test_unknown_key_is_rejected(capsys):
    with pytest.raises(SystemExit):
        _parse("--model.inner_stepz", "8")
    assert "inner_stepz" in capsys.readouterr().err


def test_invalid_values_listed_together():
    with pytest.raises(ValueError) as error:
        _parse("--model.inner_steps", "4", "--model.tr_every", "9", "--model.learning_rate", "-1")
    message = str(error.value)
    assert "model.tr_every" in message
    assert "model.learning_rate" in message


def test_unknown_adversary_source_rejected_before_training(tmp_path):
    cli = _parse("--pipeline.run_dir", str(tmp_path))
    cli.model.adversaries[0].forget_source = "forget_c"
    with pytest.raises(ValueError, match=r"model.adversaries\[0\].*'forget_c'"):
        cli.before_fit()
    assert not (tmp_path / "world").exists()


def test_pipeline_problems_name_dotted_keys():
    config = PipelineConfig()
    config.safeguard.steps = 0
    config.evaluation.seeds = []
    config.evaluation.attacks[0].data = "nowhere"
    problems = "\n".join(config.validate())
    assert "pipeline.safeguard.steps" in problems
    assert "pipeline.evaluation.seeds" in problems
    assert "pipeline.evaluation.attacks[0]" in problems


def test_hrr_config_selects_dpo_and_pairs():
    cli = make_cli(["--config", str(CONFIGS / "hrr.yaml"), "--pipeline.run_dir", "/tmp/hrr_run"], run=False)
    assert cli.config_init["pipeline"].objective == "hrr"
    assert cli.model.hparams.tr_loss == "dpo"
    assert cli.datamodule.preference_source.path == "/tmp/hrr_run/world/hrr_preferences.jsonl"
    assert cli.datamodule.tr_source is None
    assert set(cli.datamodule.adversary_sources) == {"harmful", "benign"}
    assert cli.datamodule.retain_source.response_column == "response"


def test_hrr_pipeline_problems_name_dotted_keys():
    config = PipelineConfig(objective="hrr")
    config.hrr.world.eval_compounds = 0
    config.hrr.evaluation.attacks[0].data = "forget_a"
    problems = "\n".join(config.validate())
    assert "pipeline.hrr.world.eval_compounds" in problems
    assert "pipeline.hrr.evaluation.attacks[0]" in problems


ABLATION = parse_ablation(["--config", str(CONFIGS / "ablate" / "wkr.yaml")])


@pytest.mark.parametrize("cell", ABLATION.cells, ids=lambda cell: cell.name)
def test_ablation_cell_overrides_validate(cell):
    cli = make_cli(["--config", str(MAIN_CONFIG), *cell.args], run=False)
    assert isinstance(cli.model, TARModule)
    # The same checks `fit` runs before any stage, so a cell cannot fail on its first step.
    cli._validate(cli._pipeline())


def test_tr_loss_must_fit_objective():
    cli = make_cli(["--config", str(CONFIGS / "hrr.yaml"), "--model.tr_loss", "entropy"], run=False)
    with pytest.raises(ValueError, match=r"model.tr_loss must be one of \['dpo'\] with pipeline.objective 'hrr', got 'entropy'"):
        cli._validate(cli._pipeline())
