"""The eval sets and their loader, and the offline scorers' matching rules."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from phi3flow.core.errors import StepError
from phi3flow.evaluation import eval_data
from phi3flow.evaluation.scorers import contains, exact


def test_the_full_set_is_large_categorised_and_unambiguous():
    rows = eval_data.load_jsonl(eval_data.resolve_path(eval_data.FULL_SET))
    assert len(rows) >= 100
    per_category = Counter(row.category for row in rows)
    assert set(per_category) == set(eval_data.CATEGORIES)
    assert min(per_category.values()) >= 20
    questions = [row.question for row in rows]
    assert len(set(questions)) == len(questions)
    assert all(len(row.expected.split()) <= 5 for row in rows)  # short answers only
    # an expected answer that the question itself contains would pass a parroting model
    parroted = [q for q, row in zip(questions, rows)
                if contains(q, row.expected) and row.category != "format"]
    assert not parroted, parroted


def test_the_smoke_set_is_what_the_fixture_learned():
    rows = eval_data.load_jsonl(eval_data.resolve_path(eval_data.SMOKE_SET))
    assert len(rows) == 12 and {row.category for row in rows} == {"facts"}


def test_every_malformed_line_is_named_at_once(tmp_path):
    good = {"messages": [{"role": "user", "content": "2+2?"}], "expected": "4"}
    lines = [json.dumps(good), "{oops", json.dumps(good | {"category": "maths"}),
             json.dumps({"expected": "4"}), json.dumps(good | {"expected": ""})]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StepError) as refused:
        eval_data.load_jsonl(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: 4 malformed lines: line 2 is not valid JSON")
    assert ("line 3: unknown category 'maths': use one of facts, arithmetic, units, reasoning, "
            "format") in message
    assert "line 4: has no messages field" in message
    assert "line 5: expected must be a non-empty string" in message
    assert message.endswith("Fix them and re-run; nothing was evaluated.")


def test_a_row_without_a_category_is_a_fact(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Capital of Peru?"}],
                                "expected": "Lima"}) + "\n")
    assert eval_data.load_jsonl(path)[0].category == "facts"


@pytest.mark.parametrize(("size", "chosen"), [
    (1_000_000, eval_data.SMOKE_SET),  # the committed fixture
    (999_999_999, eval_data.SMOKE_SET),
    (1_000_000_000, eval_data.FULL_SET),
    (7_642_000_000, eval_data.FULL_SET),  # Phi-3-mini-4k-instruct in bf16
])
def test_auto_chooses_by_checkpoint_size(size, chosen):
    picked, why = eval_data.choose_auto(size)
    assert picked == chosen and picked in why


@pytest.mark.parametrize(("value", "is_file"), [
    ("data/eval.jsonl", True), ("eval.jsonl", True), ("/abs/set", True),
    ("my-eval-set", False), ("d-0123456789abcdef0123456789abcdef", False),
])
def test_a_path_is_told_from_a_dataset_name(value, is_file):
    assert eval_data.is_file_value(value) is is_file


@pytest.mark.parametrize(("answer", "expected", "found"), [
    ("The capital of France is Paris.", "Paris", True),
    ("Parisian food", "Paris", False),
    ("7 + 7 = 14", "4", False),
    ("2 to the power of 10 is 1,024.", "1024", True),
    ("There are seven continents.", "7", True),
    ("Write it as seven.", "seven", True),
    ("It takes 1.5 hours.", "1.5", True),
    ("It takes 11.5 hours.", "1.5", False),
    ("carbon  dioxide", "carbon dioxide", False),
])
def test_contains_matches_whole_words(answer, expected, found):
    assert contains(answer, expected) is found


def test_exact_ignores_case_space_and_a_final_period():
    assert exact(" Madrid. ", "madrid") and not exact("It is Madrid", "Madrid")
