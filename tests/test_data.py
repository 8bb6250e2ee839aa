"""Loading question sets: every accepted shape and every bad-input error."""

from __future__ import annotations

import json

import pytest

from cpl_masks.data.demo import demo_rows, general_rows, invented_rows
from cpl_masks.data.fields import MAX_TEXT_CHARS
from cpl_masks.data.questions import (
    BUILTIN_DEMO,
    FieldNames,
    Question,
    load_questions,
    questions_sha256,
    write_questions,
)
from cpl_masks.errors import CplError
from tests.conftest import make_questions, write_rows

GOOD = {"id": "a", "question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": "B"}
# questions_sha256 of builtin:demo as the code printed it before the demo was made of plain rows:
# the published sweep results were computed on exactly these questions.
DEMO_SHA256 = "30ea2ab62f3b31094d8e789a859d7844b0f10451c0802e233649560afe9d0882"


def test_jsonl_round_trip_keeps_content_hash(tmp_path):
    questions = make_questions(10)
    path = tmp_path / "q.jsonl"
    write_questions(path, questions)
    loaded = load_questions(path)
    assert loaded == questions
    assert questions_sha256(loaded) == questions_sha256(questions)


@pytest.mark.parametrize("answer, expected", [("B", 1), ("b", 1), (1, 1), ("1", 1), (2.0, 2)])
def test_answer_forms(tmp_path, answer, expected):
    path = write_rows(tmp_path / "q.jsonl", [{**GOOD, "answer": answer}])
    assert load_questions(path)[0].answer == expected


def test_same_questions_from_json_csv_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [q.to_record() for q in make_questions(6)]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "q.parquet"))
    csv_rows = [{**row, "choices": json.dumps(row["choices"])} for row in rows]
    datasets.Dataset.from_list(csv_rows).to_csv(str(tmp_path / "q.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    reference = load_questions(write_rows(tmp_path / "q.jsonl", rows))
    for source in ("q.json", "q.csv", "q.parquet", "saved"):
        assert load_questions(tmp_path / source) == reference, source


def test_preformatted_rows_read_options_from_the_prompt(tmp_path):
    prompt = "Question: Which is a fruit?\nOptions:\nA: apple\nB. stone\nC) car\n\nPlease reply with only A, B, or C."
    path = write_rows(tmp_path / "q.jsonl", [{"question": prompt, "label": "A"}])
    (question,) = load_questions(path)
    assert question.preformatted and question.choices == ("apple", "stone", "car") and question.answer == 0
    write_questions(tmp_path / "again.jsonl", [question])
    assert load_questions(tmp_path / "again.jsonl") == [question]


def test_field_name_mapping_and_limit(tmp_path):
    rows = [{"q": f"question {i}?", "opts": ["x", "y"], "gold": i % 2} for i in range(5)]
    path = write_rows(tmp_path / "q.jsonl", rows)
    loaded = load_questions(path, fields=FieldNames(question="q", choices="opts", answer="gold"), limit=3)
    assert [q.answer for q in loaded] == [0, 1, 0]
    assert [q.id for q in loaded] == ["row-1", "row-2", "row-3"]


BAD_ROWS = [
    ([{"choices": ["a", "b"], "answer": "A"}], "row 1: missing field 'question'"),
    ([{"question": "q?", "choices": ["a", "b"]}], "row 1: missing field 'answer'"),
    ([GOOD, {**GOOD, "id": "b", "answer": "D"}], "row 2: answer 'D' is not among the 3 choices"),
    ([{**GOOD, "answer": 7}], "row 1: answer 7 is not among the 3 choices"),
    ([{**GOOD, "answer": "maybe"}], "row 1: answer 'maybe' is neither a letter"),
    ([{**GOOD, "choices": ["only one"], "answer": 0}], "row 1: 1 choices; between 2 and 26"),
    ([{**GOOD, "choices": [str(i) for i in range(27)], "answer": 0}], "row 1: 27 choices; between 2 and 26"),
    ([{**GOOD, "choices": "not a list"}], "row 1: field 'choices' is not a list"),
    ([{**GOOD, "choices": ["a", ""]}], "row 1: field 'choices' has an empty choice"),
    ([{**GOOD, "choices": ["Paris", "Rome", " Paris "]}], "row 1: duplicate choice 'Paris' (options A and C)"),
    ([{"question": "Capital?\nA: Paris\nB: Paris", "label": "A"}], "row 1: duplicate choice 'Paris' (options A and B)"),
    ([{**GOOD, "question": "x" * (MAX_TEXT_CHARS + 1)}], "row 1: field 'question' is 100,001 characters long"),
    ([{**GOOD, "choices": ["3", "4" * (MAX_TEXT_CHARS + 1)]}], "row 1: field 'choices' is 100,001 characters long"),
    ([GOOD, GOOD], "row 2: duplicate id 'a' (first at row 1)"),
    ([{"question": "no options here", "label": "A"}], "row 1: no 'choices' field"),
    ([GOOD, "{not json"], "row 2: invalid JSON"),
    ([GOOD, "[1, 2]"], "row 2: expected a JSON object"),
    (["", GOOD, "   ", "", {**GOOD, "id": "b", "answer": "D"}], "row 5: answer 'D' is not among the 3 choices"),
    ([GOOD, "", GOOD], "row 3: duplicate id 'a' (first at row 1)"),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS)
def test_bad_rows_name_file_row_and_problem(tmp_path, rows, message):
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CplError) as caught:
        load_questions(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_empty_and_non_utf8_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CplError, match="empty.jsonl: no questions"):
        load_questions(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(CplError, match="blank.jsonl: no questions \\(the file has only blank lines"):
        load_questions(blank)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(CplError, match=r"latin.jsonl: row 2: not valid UTF-8"):
        load_questions(latin)
    with pytest.raises(CplError, match="unknown file type .txt"):
        load_questions(write_rows(tmp_path / "q.txt", [GOOD]))
    with pytest.raises(CplError, match="no such file or folder"):
        load_questions(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"question": ')
    with pytest.raises(CplError, match="broken.json: invalid JSON"):
        load_questions(broken)


def test_saved_dataset_with_several_splits_needs_a_split(tmp_path):
    import datasets

    rows = [q.to_record() for q in make_questions(4)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CplError, match="choose a split with --split"):
        load_questions(tmp_path / "dd")
    assert len(load_questions(tmp_path / "dd", split="test")) == 2


def test_questions_remember_file_and_row_without_changing_equality_or_hash(tmp_path):
    questions = make_questions(3)
    path = write_rows(tmp_path / "q.jsonl", ["", *(q.to_record() for q in questions)])
    loaded = load_questions(path)
    assert [q.where for q in loaded] == [f"{path}: row {row}" for row in (2, 3, 4)]
    assert loaded == questions and {*loaded} == {*questions}
    assert questions_sha256(loaded) == questions_sha256(questions)
    assert "source" not in loaded[0].to_record() and "row" not in loaded[0].to_record()


def test_demo_questions_are_its_rows_parsed_like_a_file_and_unchanged(tmp_path):
    assert len(general_rows()) >= 150 and len(invented_rows()) >= 150
    demo = load_questions(BUILTIN_DEMO)
    assert demo == load_questions(write_rows(tmp_path / "demo.jsonl", demo_rows()))
    assert questions_sha256(demo) == DEMO_SHA256
    assert [q.id.split("-")[0] for q in demo[:4]] == ["general", "invented", "general", "invented"]
    assert demo[0] == Question(
        id="general-000",
        question="What is the capital of France?",
        choices=("Jakarta", "Lima", "Tehran", "Paris"),
        answer=3,
    )
    assert load_questions(BUILTIN_DEMO, limit=3) == demo[:3] and demo[2].where == f"{BUILTIN_DEMO}: row 3"


def test_demo_seed_reshuffles_choices_but_keeps_the_question_ids(tmp_path):
    default, other = demo_rows(), demo_rows(seed=1)
    assert [row["id"] for row in other] == [row["id"] for row in default]
    assert [row["choices"] for row in other] != [row["choices"] for row in default]
    assert len(load_questions(write_rows(tmp_path / "seed1.jsonl", other))) == len(default)


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one_is_refused(question_file, limit):
    with pytest.raises(CplError) as caught:
        load_questions(question_file, limit=limit)
    assert str(caught.value) == f"--limit {limit}: must be at least 1 (or left out for all questions)"
