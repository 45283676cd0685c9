"""evaluate's quality scorers, as MLflow GenAI scorers: each answer's trace gets one assessment
per scorer, with its rationale, in the MLflow UI.

All are offline: the expected answer as a whole word of the reply (`quality_contains`, the one
the gate uses), the reply being exactly it (`quality_exact`), the two models giving the same
answer (`agreement`), and an optional LLM judge (`judge_correct`). MLflow's built-in judges
(Correctness, ...) call hosted models, which need network access and credentials this project
never assumes; any MLflow chat model can be the judge here.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from mlflow.entities import Feedback
from mlflow.genai.scorers import Scorer, scorer

from phi3flow.core.errors import StepError
from phi3flow.core.names import TRACE_TAG_ROW
from phi3flow.evaluation import metrics


def answer_of(outputs: Any) -> str:
    """The reply text of a chat.completion response (what both models return)."""
    return outputs["choices"][0]["message"]["content"]


# A row the model raised on has a trace with the exception and no outputs: wrong, not an error
# of the scorer.
NO_ANSWER = Feedback(value=False, rationale="no answer: the model raised on this row (the "
                                            "trace shows the exception)")


_NUMBER_WORDS = {word: str(n) for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}


def contains(answer: str, expected: str) -> bool:
    """The expected text as a whole word or phrase of the answer, case-insensitively ("4" is
    not found in "14", "Paris" is found in "Paris."). A number also matches written with
    thousands separators ("1,024") or, up to twenty, as a word ("seven")."""
    expected = expected.strip()
    if re.fullmatch(r"\d+(\.\d+)?", expected):
        answer = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
        answer = re.sub(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b",
                        lambda m: _NUMBER_WORDS[m.group(1).lower()], answer, flags=re.IGNORECASE)
    pattern = rf"(?<!\w){re.escape(expected)}(?!\w)"
    return re.search(pattern, answer, flags=re.IGNORECASE) is not None


def exact(answer: str, expected: str) -> bool:
    return answer.strip().strip(".").lower() == expected.strip().strip(".").lower()


def _against_expected(name: str, matches, says: str) -> Scorer:
    """A scorer comparing the answer with the row's expected answer; `says` is the rationale,
    with {expected!r} and {not_} ("" when it matches, "not " when it does not)."""

    @scorer(name=name)
    def check(outputs: Any, expectations: dict[str, Any]) -> Feedback:
        if outputs is None:
            return NO_ANSWER
        expected = expectations["expected_response"]
        matched = matches(answer_of(outputs), expected)
        return Feedback(value=matched,
                        rationale=says.format(expected=expected, not_="" if matched else "not "))

    return check


# Each scorer is named after its metric (phi3flow/evaluation/metrics.py): its share of true rows.
quality_contains = _against_expected(metrics.QUALITY.name, contains,
                                     "{expected!r} is {not_}a word of the answer")
quality_exact = _against_expected(metrics.EXACT.name, exact, "the answer is {not_}exactly "
                                  "{expected!r} (case and a final '.' aside)")


def agreement(other: str, other_answers: dict[int, str]) -> Scorer:
    """Whether this model's answer is the other model's answer to the same row (trimmed)."""

    @scorer(name=metrics.AGREEMENT.name)
    def agrees(outputs: Any, trace) -> Feedback:
        if outputs is None:
            return NO_ANSWER
        theirs = other_answers[int(trace.info.tags[TRACE_TAG_ROW])]
        same = answer_of(outputs).strip() == theirs.strip()
        return Feedback(value=same, rationale=f"{other} answered {theirs!r}"
                                              f"{'' if same else ' (different)'}")

    return agrees


JUDGE_PROMPT = (
    "You are grading an answer to a question.\nQuestion: {question}\nReference answer: "
    "{expected}\nCandidate answer: {answer}\nDoes the candidate answer agree with the reference "
    "answer? Reply with one word: yes or no."
)


class JudgeError(StepError):
    """judge_model_uri names no model, or one that does not answer chat requests."""


def load_judge(uri: str):
    """The judge as a loaded pyfunc, checked with one chat request before any model is run."""
    import mlflow

    try:
        judge = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - any load failure is the same fix for the user
        raise JudgeError(f"judge_model_uri={uri} could not be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}): pass the URI of a "
                         "logged or registered MLflow chat model, or leave it empty.") from None
    try:
        ask(judge, "Reply with one word: yes.")
    except Exception as exc:  # noqa: BLE001
        raise JudgeError(
            f"judge_model_uri={uri} is not a chat model: asked {{\"messages\": [...]}}, it "
            f"failed with {type(exc).__name__}: {exc}. Pass an MLflow chat model (task "
            "llm/v1/chat, or a pyfunc answering chat.completion dicts), such as a model this "
            "project logs.") from None
    return judge


def ask(judge, prompt: str) -> str:
    reply = judge.predict({"messages": [{"role": "user", "content": prompt}], "max_tokens": 4})
    if isinstance(reply, list) and reply:
        reply = reply[0]
    try:
        text = answer_of(reply)
    except (KeyError, IndexError, TypeError):
        raise TypeError(f"its reply {str(reply)[:200]!r} is not a chat.completion "
                        "({\"choices\": [{\"message\": {\"content\": ...}}]})") from None
    if not isinstance(text, str):
        raise TypeError(f"its reply's content {text!r} is not a string")
    return text


def judge(judge_model) -> Scorer:
    """An LLM judge: `yes` from the judge model scores the answer correct; its reply is the
    rationale. One question at a time: a loaded pyfunc is not known to be thread-safe."""
    lock = threading.Lock()

    @scorer(name=metrics.JUDGE.name)
    def judge_correct(inputs: dict, outputs: Any, expectations: dict[str, Any]) -> Feedback:
        if outputs is None:
            return NO_ANSWER
        prompt = JUDGE_PROMPT.format(question=inputs["messages"][-1]["content"],
                                     expected=expectations["expected_response"],
                                     answer=answer_of(outputs))
        with lock:
            text = ask(judge_model, prompt)
        return Feedback(value=text.strip().lower().startswith("yes"),
                        rationale=f"the judge replied {text.strip()!r}")

    return judge_correct
