"""Command line: ``tar-lightning fit|redteam|ablate --config CONFIG [--key value ...]``.

``fit`` runs the whole job: it builds the world, pretrains the base model and applies the
initial safeguard before Lightning's fit (tamper-resistance training), then exports the TAR
model and writes the evaluation report after it. Configs are parsed in ``omegaconf+`` mode,
so ``${pipeline.run_dir}``-style interpolations are resolved after command-line overrides.

``redteam`` attacks saved models with a suite of fine-tuning attacks and writes a report;
it takes a ``redteam`` group (``tar-lightning redteam --help`` lists every option).
``ablate`` trains TAR under several settings and seeds and red-teams each run.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from tar_lightning import pipeline
from tar_lightning.ablation import AblationConfig, run_ablation
from tar_lightning.data.datamodule import TARDataModule
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.redteam import RedteamConfig, run_redteam
from tar_lightning.models import is_saved_model, save_model
from tar_lightning.module import TARModule
from tar_lightning.pipeline import PipelineConfig

log = logging.getLogger("tar_lightning")


class TARLightningCLI(LightningCLI):
    """LightningCLI with the pipeline stages around ``fit``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Only fit: the module has no validation, test or predict step.
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(PipelineConfig, "pipeline", fail_untyped=True)

    def _pipeline(self) -> PipelineConfig:
        config = self.config_init[self.subcommand]["pipeline"] if self.subcommand else self.config_init["pipeline"]
        return config

    def _validate(self, config: PipelineConfig) -> None:
        problems = config.validate()
        problems += self.model.validate_arguments(
            set(self.datamodule.adversary_sources), self.datamodule.preference_source is not None, self.datamodule.tr_batch_size
        )
        problems += pipeline.objective_problems(config, self.model.hparams.tr_loss)
        if self.trainer.max_steps is None or self.trainer.max_steps < 1:
            problems.append(f"trainer.max_steps must be a positive number of outer steps, got {self.trainer.max_steps}")
        if problems:
            raise ConfigError.from_problems("invalid configuration", problems)

    def before_fit(self) -> None:
        config = self._pipeline()
        self._validate(config)
        run_dir = Path(config.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(run_dir / "config.yaml"), overwrite=True, multifile=False)
        pipeline.build_world(config)
        pipeline.pretrain_base(config)
        pipeline.apply_safeguard(config)
        # The subcommand's keyword arguments are read from config_init after this hook.
        subcommand_config = self.config_init[self.subcommand]
        last = [
            Path(callback.dirpath) / "last.ckpt"
            for callback in self.trainer.checkpoint_callbacks
            if getattr(callback, "dirpath", None) and (Path(callback.dirpath) / "last.ckpt").is_file()
        ]
        if config.resume and subcommand_config.get("ckpt_path") is None and last:
            subcommand_config["ckpt_path"] = str(last[0])
            log.info("tar: resuming from %s; training ends at outer step %d", last[0], self.trainer.max_steps)
        else:
            log.info("tar: training for %d outer steps", self.trainer.max_steps)

    def after_fit(self) -> None:
        config = self._pipeline()
        out = config.paths["tar"]
        if self.trainer.global_step < self.trainer.max_steps:
            log.warning("tar: stopped at outer step %d of %d; not exporting or evaluating", self.trainer.global_step, self.trainer.max_steps)
            return
        if not is_saved_model(out):
            # on_train_end switched schedule-free AdamW to its averaged (eval-mode) weights.
            save_model(self.model.model, self.datamodule.tokenizer, out)
            log.info("tar: exported %s", out)
        if config.evaluation.enabled:
            pipeline.evaluate(config)


def make_cli(args: list[str] | None = None, run: bool = True) -> TARLightningCLI:
    """Parse ``args`` (``sys.argv`` when ``None``) and, when ``run`` is set, run the subcommand."""
    # Weight loading bars of transformers would print once per attack; our stages have their own.
    transformers.utils.logging.disable_progress_bar()
    # TARModule.on_save_checkpoint stores the weights itself, so this advice does not apply.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    # Let configs write ${pipeline.run_dir} although their keys sit under the "fit" subcommand.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return TARLightningCLI(
        TARModule,
        TARDataModule,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


@dataclass
class RedteamArguments:
    """Arguments of ``tar-lightning redteam``.

    Args:
        run_dir: Training run that configs refer to as ``${run_dir}``.
        redteam: Models, data, attacks and outputs of the red-team.
    """

    run_dir: str = "checkpoints/wkr"
    # Nested in this class, the suite's default attacks survive omegaconf+ interpolation.
    redteam: RedteamConfig = field(default_factory=RedteamConfig)


def _subcommand_parser(name: str, description: str, arguments: type) -> ArgumentParser:
    """Parser of ``tar-lightning <name>``: a ``--config`` file and the fields of the dataclass ``arguments``."""
    parser = ArgumentParser(prog=f"tar-lightning {name}", description=description, parser_mode="omegaconf+")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the options below")
    parser.add_class_arguments(arguments, fail_untyped=True)
    return parser


def redteam_parser() -> ArgumentParser:
    """Parser of ``tar-lightning redteam``: a ``--config`` file, ``run_dir`` and the ``redteam`` group."""
    description = "Attack saved models with a suite of fine-tuning attacks over several seeds and write a report."
    return _subcommand_parser("redteam", description, RedteamArguments)


def redteam(args: list[str]) -> dict:
    """Parse ``args`` of ``tar-lightning redteam``, save the resolved config and run the red-team."""
    transformers.utils.logging.disable_progress_bar()
    parser = redteam_parser()
    parsed = parser.parse_args(args)
    config: RedteamConfig = parser.instantiate(parsed).redteam
    problems = config.validate()
    if problems:
        raise ConfigError.from_problems("invalid red-team config", problems)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    parser.save(parsed, str(out / "config.yaml"), overwrite=True, multifile=False)
    return run_redteam(config)


@dataclass
class AblationArguments:
    """Arguments of ``tar-lightning ablate``.

    Args:
        ablation: Cells, seeds and scoring of the ablation.
    """

    ablation: AblationConfig = field(default_factory=AblationConfig)


def parse_ablation(args: list[str]) -> AblationConfig:
    """Parse ``args`` of ``tar-lightning ablate`` into its config."""
    description = "Train TAR under several settings and seeds and red-team each run."
    parser = _subcommand_parser("ablate", description, AblationArguments)
    return parser.instantiate(parser.parse_args(args)).ablation


def ablate(args: list[str]) -> dict:
    """Parse ``args`` of ``tar-lightning ablate`` and run the ablation."""
    return run_ablation(parse_ablation(args))


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``tar-lightning``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    words = sys.argv[1:] if args is None else list(args)
    try:
        if words and words[0] == "redteam":
            redteam(words[1:])
        elif words and words[0] == "ablate":
            ablate(words[1:])
        else:
            # LightningCLI reads sys.argv itself when given None, and warns when given both.
            make_cli(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
