"""evaluate's worker: one model, one fresh process, every row answered, timed and traced.

`python -m phi3flow.evaluation.eval_worker SPEC_JSON RESULT_JSON`, started by
`evaluation.evaluate_in_fresh_process`: a process of its own, so the model's load time and peak
memory are not the other model's leftovers. Each answer is an MLflow trace (request, response,
token usage, latency) in the model's evaluation run, linked to its logged model; evaluate then
scores those traces with MLflow's GenAI evaluation. A row the model fails on is a trace with the
error, and the other rows go on. On a tracking store without a trace API (an Azure ML workspace;
evaluate probes it, `WorkerSpec.tracing`) tracing is off and each answer comes back in the
result with its full response, which evaluate scores itself. Its input and output are the
records of phi3flow/evaluation/records.py.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

from phi3flow.core import redact
from phi3flow.core.names import TRACE_TAG_CATEGORY, TRACE_TAG_ROW
from phi3flow.evaluation.eval_data import EvalRow
from phi3flow.evaluation.records import Answer, LongPrompt, WorkerResult, WorkerSpec

logger = logging.getLogger(__name__)

# Span attributes MLflow reads: token usage (shown in the UI's trace view) and our TTFT.
TOKEN_USAGE = "mlflow.chat.tokenUsage"
ATTR_TTFT = "phi3flow.ttft_s"
# A RAG-style prompt, for the time to first token at length: prefill speed is where the two
# models differ most (the int4 ONNX model can take longer than bf16 torch; docs/speed.md).
LONG_PROMPT_TOKENS = 1024
FILLER = ("The report covers rivers, capitals, numbers and the weather of many small towns "
          "across the northern provinces during the last ten years. ")


def _answer(model, messages, max_tokens: int) -> tuple[dict, float]:
    started = time.perf_counter()
    (response,) = model.predict({"messages": list(messages), "max_tokens": max_tokens})
    return response, time.perf_counter() - started


def long_prompt_ttft(model, tokens: int) -> LongPrompt | None:
    """Time to first token of a `tokens`-token prompt (a 1-token request), or None if the model
    cannot take it. The text is sized in two tries: tokens per word differ between vocabularies."""
    words = FILLER.split()
    count = tokens
    try:
        for _ in range(2):
            text = " ".join(words[i % len(words)] for i in range(count))
            response, seconds = _answer(model, [{"role": "user", "content": text}], 1)
            used = response["usage"]["prompt_tokens"]
            if abs(used - tokens) <= tokens // 10:
                break
            count = max(1, count * tokens // used)
    except Exception as exc:  # noqa: BLE001 - a measurement, not a row: the run goes on
        logger.warning("the %d-token prompt's first token could not be timed: %s: %s", tokens,
                       type(exc).__name__, exc)
        return None
    return LongPrompt(prompt_tokens=used, ttft_s=seconds)


def run_worker(spec: WorkerSpec) -> WorkerResult:
    """Load the model once, answer every row, and time each answer and its first token."""
    import mlflow

    if not spec.tracing:  # no span, so no call to a trace API the store does not have
        mlflow.tracing.disable()
    mlflow.set_experiment(experiment_id=spec.experiment_id)
    if spec.model_id:  # a models:/m-... model: its traces link to it
        mlflow.set_active_model(model_id=spec.model_id)
    started = time.perf_counter()
    # The model's files, fetched once: loaded from here and measured here (a workspace's
    # artifact listing has no sizes, and a second download of a 7.6 GB model costs minutes).
    local = Path(mlflow.artifacts.download_artifacts(spec.model_location))
    model = mlflow.pyfunc.load_model(str(local))
    load_seconds = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) / 1e6
    _answer(model, spec.rows[0].messages, 1)  # warm-up, not measured
    answers, clock = [], time.perf_counter()
    for index, row in enumerate(spec.rows):
        answers.append(answer_row(model, spec, index, row))
        if (index + 1) % 10 == 0 or index + 1 == len(spec.rows):
            logger.info("%s: %d/%d rows answered (%.0f s)", spec.name, index + 1,
                        len(spec.rows), time.perf_counter() - clock)
    logger.info("%s: timing the first token of a %d-token prompt", spec.name,
                LONG_PROMPT_TOKENS)
    return WorkerResult(load_s=load_seconds, size_mb=size_mb, peak_rss_mb=peak_rss_mb(),
                        answers=tuple(answers),
                        long_prompt=long_prompt_ttft(model, LONG_PROMPT_TOKENS))


def answer_row(model, spec: WorkerSpec, index: int, row: EvalRow) -> Answer:
    """One row answered in its own span (its trace, with tracing on); a failure is the row's."""
    import mlflow
    from mlflow.entities import SpanType

    request = {"messages": list(row.messages), "max_tokens": spec.max_new_tokens}
    failure = None
    try:
        # Time to first token, measured the same way for both models: a 1-token request (the
        # transformers pyfunc has no streaming to time the first chunk of). Outside the
        # answer's span, so the trace's latency is the answer's own.
        _, ttft = _answer(model, row.messages, 1)
    except Exception as exc:  # noqa: BLE001 - one row's failure is that row's result
        failure = exc
    with mlflow.start_span(name=spec.name, span_type=SpanType.CHAT_MODEL,
                           run_id=spec.run_id) as span:
        span.set_inputs(request)
        if spec.tracing:
            mlflow.update_current_trace(tags={TRACE_TAG_ROW: str(index),
                                               TRACE_TAG_CATEGORY: row.category})
        trace_id = span.trace_id if spec.tracing else None
        try:
            if failure is not None:
                raise failure
            response, latency = _answer(model, row.messages, spec.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - one row's failure is that row's result
            logger.warning("row %d: the model raised %s: %s; the row counts as wrong",
                           index, type(exc).__name__, exc)
            span.record_exception(exc)
            return Answer(trace_id=trace_id, error=redact.error_text(exc, 2000))
        usage = response["usage"]
        span.set_outputs(response)
        span.set_attributes({TOKEN_USAGE: {"input_tokens": usage["prompt_tokens"],
                                           "output_tokens": usage["completion_tokens"],
                                           "total_tokens": usage["total_tokens"]},
                             ATTR_TTFT: ttft})
    choice = response["choices"][0]
    return Answer(trace_id=trace_id, answer=choice["message"]["content"],
                  response=None if spec.tracing else response,
                  finish_reason=choice["finish_reason"], prompt_tokens=usage["prompt_tokens"],
                  completion_tokens=usage["completion_tokens"], latency_s=latency, ttft_s=ttft)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (this one by default; 0 for a process that is gone).

    VmHWM belongs to the process's own address space, so it starts afresh at exec; getrusage's
    ru_maxrss does not: a child forked from a big parent reports the parent's peak.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    if pid == "self":  # not Linux: best effort
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return 0.0


def main(argv: list[str]) -> None:
    spec, out = argv  # positional: only evaluate starts this
    result = run_worker(WorkerSpec.from_json(Path(spec).read_text(), f"worker spec {spec}"))
    Path(out).write_text(result.to_json())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)
    redact.install_log_filter()
    main(sys.argv[1:])
