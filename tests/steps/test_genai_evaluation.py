"""evaluate through MLflow's GenAI evaluation, checked through MLflow's API (not the UI): a trace
per answer with its assessments, each model's evaluation run linked to its logged model, quality
per category, eval sets from MLflow evaluation datasets, and judges that fail."""

from __future__ import annotations

import json
import re
import textwrap

import mlflow
import pytest

from phi3flow.core import names
from phi3flow.core.errors import StepError
from phi3flow.evaluation import eval_data, scorers
from phi3flow.evaluation import evaluate as evaluation
from phi3flow.evaluation.decision import GATED_ON, MODELS, Decision
from phi3flow.evaluation.metrics import AGREEMENT, EXACT, JUDGE, QUALITY
from phi3flow.evaluation.records import Answer, WorkerResult, WorkerSpec
from steps import evaluate
from tests.helpers import EVAL_DATA, created_run, eval_rows, evaluate_args

SCORERS = (QUALITY.name, EXACT.name, AGREEMENT.name)


@pytest.fixture
def genai_evaluated(evaluated):
    return evaluated


def traces_of(run_id: str) -> list:
    run = mlflow.get_run(run_id)
    return mlflow.search_traces(locations=[run.info.experiment_id], run_id=run_id,
                                return_type="list")


def assessments(trace) -> dict:
    return {a.name: a for a in trace.info.assessments}


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_each_model_has_an_evaluation_run_with_a_trace_per_answer(genai_evaluated):
    """One child run per model; each row is one trace: the request, the chat.completion answer,
    token usage, latency, linked to the model's logged model, in the eval set's row order."""
    run, decision = genai_evaluated
    rows = eval_rows()
    assert set(decision.eval_runs) == set(MODELS)
    for name, child_id in decision.eval_runs.items():
        child = mlflow.get_run(child_id)
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert child.data.tags[names.TAG_EVALUATES] == name
        assert child.info.run_name == f"evaluate/{name}"
        model_id = decision.models[name].model_uri.split("/")[-1]
        traces = sorted(traces_of(child_id), key=lambda t: int(t.info.tags[names.TRACE_TAG_ROW]))
        assert len(traces) == len(rows)
        for trace, row in zip(traces, rows):
            assert trace.info.request_metadata["mlflow.modelId"] == model_id
            assert trace.info.tags[names.TRACE_TAG_CATEGORY] == row["category"]
            assert json.loads(trace.data.request)["messages"] == row["messages"]
            response = json.loads(trace.data.response)
            assert response["object"] == "chat.completion"
            usage = trace.info.token_usage
            assert usage["output_tokens"] == response["usage"]["completion_tokens"] > 0
            assert trace.info.execution_duration > 0  # ms, the answer's latency


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_every_answer_has_an_assessment_per_scorer_with_a_rationale(genai_evaluated):
    run, decision = genai_evaluated
    rows = eval_rows()
    for name, child_id in decision.eval_runs.items():
        other = next(m for m in MODELS if m != name)
        for trace in traces_of(child_id):
            row = rows[int(trace.info.tags[names.TRACE_TAG_ROW])]
            found = assessments(trace)
            assert found["expected_response"].value == row["expected"]
            # the fixture answers in sentences: the expected word is in each, never all of it
            for scorer, value in zip(SCORERS, (True, False, True)):
                assert found[scorer].value is value, (name, scorer, found[scorer].rationale)
                assert found[scorer].rationale
                assert found[scorer].metadata["mlflow.assessment.sourceRunId"] == child_id
            assert found[AGREEMENT.name].rationale.startswith(
                f"{other} answered")
        # MLflow's own aggregate of each scorer, on the evaluation run
        metrics = mlflow.get_run(child_id).data.metrics
        assert metrics[f"{QUALITY.name}/mean"] == 1.0
        assert metrics["latency_p95_s"] == decision.metrics[name]["latency_p95_s"]


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_the_decision_names_its_gate_and_reports_quality_per_category(genai_evaluated):
    run, decision = genai_evaluated
    assert Decision.read(mlflow.get_run(run.info.run_id)) == decision
    assert decision.gated_on == tuple(metric.name for metric in GATED_ON)
    assert decision.eval_data == str(EVAL_DATA)  # auto on the 1 MB fixture: the smoke set
    assert run.data.tags[names.TAG_EVAL_DATA] == str(EVAL_DATA)
    for name in MODELS:
        assert decision.quality_by_category[name] == {
            "facts": {"rows": 12.0, QUALITY.name: 1.0, EXACT.name: 0.0}}
        assert mlflow.get_run(run.info.run_id).data.metrics[
            f"{name}_{QUALITY.name}_facts"] == 1.0
    # First tokens at the rows' median prompt and at a long one, each a measured length.
    onnx = decision.metrics["onnx"]
    assert abs(onnx["long_prompt_tokens"] - 1024) <= 102 and onnx["prompt_tokens_p50"] < 200
    assert all(decision.metrics[m]["ttft_long_prompt_s"] > 0 for m in MODELS)
    assert set(decision.faster_first_token) == {
        str(int(onnx["prompt_tokens_p50"])), str(int(onnx["long_prompt_tokens"]))}
    assert set(decision.faster_first_token.values()) <= set(MODELS)


@pytest.mark.e2e  # a whole evaluation of its own
def test_the_full_set_gates_the_fixture_out_and_reports_every_category(log_runs):
    """The 120-row set is beyond what the 0.2 M-parameter fixture learned: both models fail the
    gate on quality, and quality is reported for each of the five categories."""
    decision = evaluate.main(evaluate_args(log_runs, "--eval_data", eval_data.FULL_SET))
    assert decision.eval_data == str(eval_data.resolve_path(eval_data.FULL_SET))
    assert not decision.chosen_passed
    for name in MODELS:
        assert decision.metrics[name][QUALITY.name] < 0.8
        assert decision.verdicts[name].reasons[0].startswith("quality ")
        per = decision.quality_by_category[name]
        assert list(per) == list(eval_data.CATEGORIES)
        assert all(values["rows"] == 24.0 for values in per.values())
        assert len(traces_of(decision.eval_runs[name])) == 120


@pytest.mark.e2e  # a whole evaluation of its own
def test_a_row_the_model_fails_on_loses_only_that_row(log_runs, tmp_path):
    """A prompt longer than the ONNX model's 4,096-token context: that row's trace holds the
    error and the row counts as wrong; the other rows are answered and scored."""
    rows = EVAL_DATA.read_text().splitlines(keepends=True)[:3]
    too_long = {"messages": [{"role": "user", "content": "word " * 5000}], "expected": "x"}
    subset = tmp_path / "eval.jsonl"
    subset.write_text("".join(rows) + json.dumps(too_long) + "\n")
    decision = evaluate.main(evaluate_args(log_runs, "--eval_data", str(subset)))
    onnx = decision.metrics["onnx"]
    assert onnx["failed_rows"] == 1.0 and onnx["scorer_errors"] == 0.0
    assert onnx[QUALITY.name] == 0.75  # 3 of 4: the failed row counts as wrong
    failed = next(t for t in traces_of(decision.eval_runs["onnx"])
                  if t.info.tags[names.TRACE_TAG_ROW] == "3")
    assert failed.info.state == "ERROR"
    assert "context window" in failed.data.spans[0].events[0].attributes["exception.message"]
    assert assessments(failed)[QUALITY.name].rationale.startswith("no answer")
    table = mlflow.load_table(names.EVAL_TABLE, run_ids=[created_run().info.run_id])
    assert "context window" in table["onnx_error"][3] and table["onnx_error"][0] == ""


def write_judge(tmp_path, body: str) -> str:
    """A judge logged from code: a stand-in for a real judge model, saying what it is told."""
    code = tmp_path / "judge.py"
    code.write_text(textwrap.dedent("""
        import mlflow
        from mlflow.pyfunc import PythonModel

        class Judge(PythonModel):
            def predict(self, context, model_input, params=None):
                prompt = model_input["messages"][0][-1]["content"] if hasattr(
                    model_input, "columns") else model_input["messages"][-1]["content"]
        """) + textwrap.indent(textwrap.dedent(body), " " * 8) + "\nmlflow.models.set_model(Judge())\n")
    with mlflow.start_run(run_name="judge stand-in"):
        return mlflow.pyfunc.log_model(name="judge", python_model=str(code)).model_uri


def chat(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.mark.e2e  # a whole evaluation of its own
def test_a_judge_that_fails_on_one_row_loses_only_that_row(log_runs, tmp_path):
    """A stand-in judge that raises on one question: that row's judge assessment is the error,
    counted as wrong; every other row keeps its scores, and the step finishes."""
    judge = write_judge(tmp_path, f"""
        if "capital of Spain" in prompt:
            raise RuntimeError("judge overloaded")
        return [{chat('yes')!r}]
        """)
    subset = tmp_path / "eval.jsonl"
    subset.write_text("".join(EVAL_DATA.read_text().splitlines(keepends=True)[:3]))
    decision = evaluate.main(evaluate_args(log_runs, "--eval_data", str(subset),
                                           "--judge_model_uri", judge))
    for name in MODELS:
        assert decision.metrics[name][JUDGE.name] == pytest.approx(2 / 3)
        assert decision.metrics[name]["scorer_errors"] == 1.0
        assert decision.metrics[name][QUALITY.name] == 1.0  # untouched by the judge
        by_row = {int(t.info.tags[names.TRACE_TAG_ROW]): assessments(t)
                  for t in traces_of(decision.eval_runs[name])}
        assert "judge overloaded" in by_row[0][JUDGE.name].error.error_message
        assert by_row[1][JUDGE.name].value is True
        assert by_row[1][JUDGE.name].rationale == "the judge replied 'yes'"
    assert mlflow.get_run(created_run().info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize(("body", "message"), [
    ("return 'yes'", "is not a chat model.*is not a chat.completion"),
    ("raise ValueError('needs a prompt column')", "is not a chat model.*needs a prompt column"),
])
def test_a_judge_that_is_not_a_chat_model_is_refused_before_any_work(log_runs, tmp_path, body,
                                                                      message):
    judge = write_judge(tmp_path, body)
    with pytest.raises(StepError, match=message):
        evaluate.main(evaluate_args(log_runs, "--judge_model_uri", judge))
    failed = mlflow.get_run(created_run().info.run_id)
    assert failed.info.status == "FAILED"
    assert not mlflow.search_runs([failed.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = "
                                                f"'{failed.info.run_id}'")


def test_a_judge_that_cannot_load_is_refused(log_runs):
    with pytest.raises(StepError, match="judge_model_uri=models:/m-0000 could not be loaded"):
        evaluate.main(evaluate_args(log_runs, "--judge_model_uri", "models:/m-0000"))


@pytest.fixture
def dataset():
    """An MLflow evaluation dataset with the first three rows of the smoke set."""
    made = mlflow.genai.datasets.create_dataset(name=f"phi3-eval-{id(object())}")
    made.merge_records([{"inputs": {"messages": row["messages"]},
                         "expectations": {"expected_response": row["expected"]},
                         "tags": {"category": row["category"]}} for row in eval_rows()[:3]])
    return made


@pytest.mark.e2e  # a whole evaluation of its own
@pytest.mark.parametrize("by", ["name", "dataset_id"])
def test_eval_data_can_be_an_mlflow_evaluation_dataset(log_runs, dataset, by):
    decision = evaluate.main(evaluate_args(log_runs, "--eval_data", getattr(dataset, by)))
    assert decision.eval_data == f"MLflow evaluation dataset {dataset.name} ({dataset.dataset_id})"
    assert decision.quality_by_category["onnx"]["facts"]["rows"] == 3.0
    assert len(traces_of(decision.eval_runs["onnx"])) == 3


def test_a_malformed_evaluation_dataset_names_each_bad_record(log_runs, dataset):
    dataset.merge_records([
        {"inputs": {"question": "What is 2+2?"}, "expectations": {"expected_response": "4"}},
        {"inputs": {"messages": [{"role": "user", "content": "2+2?"}]},
         "expectations": {"expected_response": "4"}, "tags": {"category": "maths"}},
    ])
    with pytest.raises(StepError, match="2 malformed records: record ") as refused:
        evaluate.main(evaluate_args(log_runs, "--eval_data", dataset.dataset_id))
    assert re.search(r"record \d \(dr-\w+\): has no inputs.messages field", str(refused.value))
    assert re.search(r"record \d \(dr-\w+\): unknown category 'maths': use one of facts, "
                     "arithmetic, units, reasoning, format", str(refused.value))
    assert "nothing was evaluated" in str(refused.value)


def test_an_unknown_dataset_name_says_how_to_make_one(log_runs):
    with pytest.raises(StepError, match="no MLflow evaluation dataset of that name.*"
                                        "create_dataset"):
        evaluate.main(evaluate_args(log_runs, "--eval_data", "no-such-set"))


def test_auto_picks_the_full_set_for_a_real_sized_checkpoint():
    assert eval_data.choose_auto(7_600_000_000)[0] == eval_data.FULL_SET
    assert eval_data.choose_auto(1_000_000)[0] == eval_data.SMOKE_SET


@pytest.mark.e2e  # a real evaluation (the session's one)
def test_scoring_without_traces_gives_each_row_what_mlflow_gave_it(genai_evaluated):
    """A store without a trace API gets the same scorers on the same rows (evaluation.
    score_without_traces): fed the answers MLflow scored, it reaches the same value on every
    row and the same `<scorer>/mean` metrics."""
    run, decision = genai_evaluated
    rows = tuple(eval_data.load(str(EVAL_DATA))[0])
    traces = {name: sorted(traces_of(child), key=lambda t: int(t.info.tags[names.TRACE_TAG_ROW]))
              for name, child in decision.eval_runs.items()}
    answers = {name: tuple(Answer(trace_id=None, answer=scorers.answer_of(response),
                                  response=response)
                           for response in (json.loads(t.data.response) for t in found))
               for name, found in traces.items()}
    for name in MODELS:
        other = next(m for m in MODELS if m != name)
        quality = [scorers.quality_contains, scorers.quality_exact,
                   scorers.agreement(other, dict(enumerate(a.answer for a in answers[other])))]
        with mlflow.start_run() as scratch:
            spec = WorkerSpec(name=name, model_uri="unused", model_location="unused",
                              experiment_id=scratch.info.experiment_id,
                              run_id=scratch.info.run_id, max_new_tokens=32, rows=rows,
                              tracing=False)
            result = WorkerResult(load_s=0.0, size_mb=0.0, peak_rss_mb=0.0,
                                  answers=answers[name])
            values = evaluation.score_without_traces(spec, result, quality)
        assert values == {scorer: [assessments(t)[scorer].value for t in traces[name]]
                          for scorer in SCORERS}
        ours = mlflow.get_run(scratch.info.run_id).data.metrics
        theirs = mlflow.get_run(decision.eval_runs[name]).data.metrics
        assert {k: ours[k] for k in ours} == {k: theirs[k] for k in ours}
        assert set(ours) == {f"{scorer}/mean" for scorer in SCORERS}
    assert evaluation.trace_api(run.info.experiment_id)[0]  # a local store keeps traces
    assert decision.scoring == evaluation.WITH_TRACES
