"""Optional scoring with lm-evaluation-harness tasks, such as ``wmdp_bio`` or ``mmlu`` subsets.

Install it with ``pip install -e ".[harness]"``. Tasks are looked up in the harness's own
registry and in ``include_path``, a folder of task YAML files, which is how a local task
(one whose data files lie on disk) is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks scored on every model before and after every attack.

    Args:
        tasks: Task or group names, for example ``[wmdp_bio, mmlu_college_biology]``.
        include_path: Folder of extra task YAML files; ``null`` uses the registry only.
        limit: Score at most this many documents per task (all when ``null``).
        num_fewshot: Few-shot examples per prompt; ``null`` keeps each task's default.
        batch_size: Sequences per forward pass.
        metric: Metric read from each task's results.
    """

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 32
    metric: str = "acc,none"

    def validate(self, key: str) -> list[str]:
        problems = []
        if not self.tasks:
            problems.append(f"{key}.tasks must name at least one task, or set {key} to null")
        if self.limit is not None and self.limit < 1:
            problems.append(f"{key}.limit must be at least 1 or null, got {self.limit}")
        if self.batch_size < 1:
            problems.append(f"{key}.batch_size must be at least 1, got {self.batch_size}")
        return problems


def check_harness_installed() -> None:
    """Raise ``ImportError`` with the install command when lm-evaluation-harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError('lm-evaluation-harness is not installed; run: pip install -e ".[harness]"') from error


def harness_scores(model, tokenizer, config: HarnessConfig) -> dict[str, float]:
    """Score ``model`` on ``config.tasks``; return ``{"<task>_<metric name>": value}``.

    The model is wrapped in memory, so attacked weights are scored without being saved.
    """
    check_harness_installed()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    output = lm_eval.simple_evaluate(
        model=wrapped,
        tasks=list(config.tasks),
        task_manager=TaskManager(include_path=config.include_path),
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        log_samples=False,
    )
    model.train(was_training)
    metric_name = config.metric.split(",")[0]
    scores = {}
    for task, metrics in output["results"].items():
        if config.metric in metrics:
            scores[f"{task}_{metric_name}"] = float(metrics[config.metric])
    if not scores:
        raise ValueError(f"no task of {config.tasks} reported metric {config.metric!r}; set harness.metric to one they report")
    return scores
