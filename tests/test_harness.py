"""The lm-evaluation-harness wiring, checked offline on a local task built from the tiny world."""

import pytest

from tar_lightning.data.sources import QuestionSource, load_questions
from tar_lightning.evaluation.harness import HarnessConfig, harness_scores
from tar_lightning.evaluation.mcq import multiple_choice_accuracy
from tar_lightning.models import load_causal_lm, load_tokenizer

pytest.importorskip("lm_eval")

TASK = """\
task: tiny_forget
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_local_task_matches_our_multiple_choice_accuracy(tiny_run, tmp_path):
    questions_file = tiny_run / "world" / "forget_eval.jsonl"
    (tmp_path / "tiny_forget.yaml").write_text(TASK.format(data=questions_file))
    model = load_causal_lm(tiny_run / "model_a")
    tokenizer = load_tokenizer(tiny_run / "model_a")

    scores = harness_scores(model, tokenizer, HarnessConfig(tasks=["tiny_forget"], include_path=str(tmp_path), batch_size=8))

    # The task scores each option as a " "-separated continuation, as our scorer does.
    ours = multiple_choice_accuracy(model, tokenizer, load_questions(QuestionSource(str(questions_file))))
    assert scores == {"tiny_forget_acc": pytest.approx(ours.value)}


def test_unknown_metric_is_reported(tiny_run, tmp_path):
    (tmp_path / "tiny_forget.yaml").write_text(TASK.format(data=tiny_run / "world" / "forget_eval.jsonl"))
    config = HarnessConfig(tasks=["tiny_forget"], include_path=str(tmp_path), metric="f1,none", limit=2)

    with pytest.raises(ValueError, match="metric 'f1,none'"):
        harness_scores(load_causal_lm(tiny_run / "model_a"), load_tokenizer(tiny_run / "model_a"), config)


def test_config_problems_name_keys():
    problems = HarnessConfig(tasks=[], limit=0, batch_size=0).validate("redteam.harness")

    assert len(problems) == 3
    assert all(problem.startswith("redteam.harness.") for problem in problems)


def test_redteam_reports_harness_scores_after_attacks(tiny_run, tmp_path):
    from tar_lightning.data.sources import TextSource
    from tar_lightning.evaluation.attacks import AttackConfig
    from tar_lightning.evaluation.redteam import RedteamConfig, run_redteam

    world = tiny_run / "world"
    (tmp_path / "tiny_forget.yaml").write_text(TASK.format(data=world / "forget_eval.jsonl"))
    config = RedteamConfig(
        checkpoints=[str(tiny_run / "model_a")],
        output_dir=str(tmp_path / "redteam"),
        corpora={"forget_a": TextSource(str(world / "adversary_forget_a.jsonl"))},
        questions={"forget": QuestionSource(str(world / "forget_eval.jsonl")), "retain": QuestionSource(str(world / "retain_eval.jsonl"))},
        attacks=[AttackConfig(name="adamw", steps=3, batch_size=4, learning_rate=1e-2)],
        seeds=[0],
        harness=HarnessConfig(tasks=["tiny_forget"], include_path=str(tmp_path), batch_size=8),
        tensorboard=False,
    )

    entry = run_redteam(config)["models"]["model_a"]

    # The harness task and the built-in scorer read the same questions, so they agree.
    assert entry["before"]["tiny_forget_acc"] == pytest.approx(entry["before"]["forget_acc"])
    after = entry["attacks"]["adamw"]
    assert after["tiny_forget_acc"]["mean"] == pytest.approx(after["forget_acc"]["mean"])
