"""Hostile data: every field of a question row from every source, and the tracked text of a run and a sweep.

A question row loads to well-typed questions or fails as one ``CplError`` naming the file and the row; a
tracked text (``--track-text``) is read, decoded and judged before any model loads, and its loss is never NaN.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.data.fields import MAX_ID_CHARS, MAX_TEXT_CHARS
from cpl_masks.data.questions import load_questions
from cpl_masks.errors import CplError
from tests.conftest import make_questions, write_rows

PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
GOOD = {"id": "q1", "question": "What is the capital of France?", "choices": ["Paris", "Rome"], "answer": "A"}
HUGE = "1" * 5000  # more digits than Python's int() parses (4,300)
runner = CliRunner()


def one_line_error(source: Path, row: int | None = None, match: str = "") -> pytest.RaisesContext:
    """``pytest.raises`` for a CplError that starts with the file (and row) name and holds ``match``."""
    prefix = f"{source}: row {row}: " if row is not None else f"{source}: "
    return pytest.raises(CplError, match="^" + _escape(prefix) + ".*" + match)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows as CSV, lists and dicts as JSON text in their cell (as the loader reads them)."""
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


# --- defect 11: a 5,000-digit number anywhere is a one-line error, not Python's digit-limit traceback ---


@pytest.mark.parametrize("field", ["answer", "id", "choices", "label"])
def test_a_5000_digit_json_number_is_a_one_line_error(tmp_path, field):
    value = '["Paris", ' + HUGE + "]" if field == "choices" else HUGE
    good = {k: v for k, v in GOOD.items() if field != "label" or k != "answer"}  # a label is read without an answer
    row = json.dumps({**good, field: "X"}).replace('"X"', value)
    jsonl = write_rows(tmp_path / "q.jsonl", [{**GOOD, "id": "q0"}, row])
    with one_line_error(jsonl, 2, "5,000 digits"):
        load_questions(jsonl)
    document = tmp_path / "q.json"
    document.write_text("[" + json.dumps({**GOOD, "id": "q0"}) + ", " + row + "]")
    with one_line_error(document, match="5,000 digits"):
        load_questions(document)


@pytest.mark.parametrize("answer", [HUGE, "-" + HUGE, "0" * 4999 + "1", " " + HUGE + " "])
def test_a_5000_digit_answer_string_is_a_one_line_error(tmp_path, answer):
    rows = [{**GOOD, "id": "q0"}, {**GOOD, "answer": answer}]
    for path in (write_rows(tmp_path / "q.jsonl", rows), write_csv(tmp_path / "q.csv", rows)):
        with pytest.raises(CplError) as caught:
            load_questions(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: row 2: answer ") and "not among the 2 choices" in message
        assert len(message) < 300  # the value is shown shortened, not 5,000 characters of it


def test_a_5000_digit_csv_cell_and_choice_is_a_one_line_error(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(f'question,choices,answer\nq?,"[""a"", {HUGE}]",A\n')
    with one_line_error(path, 1, "5,000 digits"):
        load_questions(path)


def test_a_5000_digit_answer_exits_2_in_one_line_through_the_cli(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [json.dumps(GOOD).replace('"A"', HUGE)])
    result = runner.invoke(app, ["split", "--data", str(path), "--model", "x", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "row 1" in result.output and "Traceback" not in result.output


# --- defect 18: a null (or any non-text) choice is refused, not loaded as the text "None" ---


@pytest.mark.parametrize(
    "choices, shown",
    [
        ([None, "paris"], "choice A must be text or a finite number, not null"),
        (["paris", True], "choice B must be text or a finite number, not a boolean"),
        (["paris", ["rome"]], "choice B must be text or a finite number, not a list"),
        (["paris", {"text": "rome"}], "choice B must be text or a finite number, not an object"),
        (["paris", float("nan")], "choice B must be text or a finite number, not (nan|inf)"),
        (["paris", float("inf")], "choice B must be text or a finite number, not (nan|inf)"),
    ],
)
def test_a_choice_that_is_not_text_is_refused(tmp_path, choices, shown):
    line = json.dumps({**GOOD, "choices": choices})  # NaN and Infinity are written as Python's json reads them
    path = write_rows(tmp_path / "q.jsonl", [line])
    with one_line_error(path, 1, "field 'choices': " + shown):
        load_questions(path)
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("question,choices,answer\nq?," + '"' + json.dumps(choices).replace('"', '""') + '",A\n')
    with one_line_error(csv_path, 1, "field 'choices': " + shown):
        load_questions(csv_path)


def test_numbers_are_their_json_spelling_as_choices_and_ids_from_every_format(tmp_path):
    import datasets

    rows = [{"id": 7, "question": "Which is prime?", "choices": [4, 7], "answer": 1}]
    expected = ("7", ("4", "7"), 1)
    sources = [write_rows(tmp_path / "q.jsonl", rows), write_csv(tmp_path / "q.csv", rows)]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "q.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in [*sources, tmp_path / "q.json", tmp_path / "q.parquet", tmp_path / "saved"]:
        (question,) = load_questions(source)
        assert (question.id, question.choices, question.answer) == expected, source
    floats = write_rows(tmp_path / "f.jsonl", [{**GOOD, "choices": [0.5, 2.0, 1e100]}])
    assert load_questions(floats)[0].choices == ("0.5", "2.0", "1e+100")


def test_csv_cells_are_text_not_guessed_numbers(tmp_path):
    """An id column with a blank cell must not turn 2 into '2.0' (as a type-guessing reader does)."""
    path = tmp_path / "q.csv"
    path.write_text('id,question,choices,answer\n,q1?,"[""a"", ""b""]",1\n2,q2?,"[""a"", ""b""]",0\n')
    assert [question.id for question in load_questions(path)] == ["row-1", "2"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({**GOOD, "id": True}, "field 'id' must be text or a finite number, not a boolean"),
        ({**GOOD, "id": ["a"]}, "field 'id' must be text or a finite number, not a list"),
        ({**GOOD, "preformatted": "no"}, "field 'preformatted' must be true or false"),
        ({**GOOD, "answer": ["A"]}, "field 'answer' must be a letter or a 0-based index"),
    ],
)
def test_other_fields_of_the_wrong_type_are_refused(tmp_path, row, message):
    path = write_rows(tmp_path / "q.jsonl", [row])
    with one_line_error(path, 1, _escape(message)):
        load_questions(path)


def test_a_hub_dataset_is_checked_as_a_file_is(monkeypatch):
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split=None: datasets.Dataset.from_list([{**GOOD, "id": "x" * 5000}])
    )
    with pytest.raises(CplError, match="^questions-on-the-hub: row 1: field 'id' is 5,000 characters long"):
        load_questions("questions-on-the-hub")


# --- defect 25: an id has a length cap as every other field has ---


def test_a_5_megabyte_id_is_refused(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [{**GOOD, "id": "x" * 5_000_000}])
    with one_line_error(path, 1, f"field 'id' is 5,000,000 characters long; at most {MAX_ID_CHARS:,}"):
        load_questions(path)
    assert load_questions(write_rows(tmp_path / "ok.jsonl", [{**GOOD, "id": "x" * MAX_ID_CHARS}]))


def test_a_duplicate_long_id_is_shown_shortened(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [{**GOOD, "id": "y" * MAX_ID_CHARS}] * 2)
    with pytest.raises(CplError, match="row 2: duplicate id") as caught:
        load_questions(path)
    assert len(str(caught.value)) < 300


def test_an_answer_as_a_choice_text_has_the_text_cap(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [{**GOOD, "answer": "P" * (MAX_TEXT_CHARS + 1)}])
    with one_line_error(path, 1, "field 'answer' is 100,001 characters long"):
        load_questions(path)


# --- the class: any JSON value in any field, from every source ---

TEXT = st.text(max_size=8)
NUMBER = st.integers() | st.floats() | st.integers(min_value=10**4400, max_value=10**5100)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBER | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=2),
    max_leaves=6,
)
FIELD = JSON | st.sampled_from(["A", "b", "0", "1", HUGE, "x" * (MAX_ID_CHARS + 1), "Paris"])
CHOICES = st.lists(TEXT | NUMBER | st.none() | st.booleans(), max_size=4) | FIELD
ROW = st.fixed_dictionaries(
    {"question": TEXT | FIELD},
    optional={"id": FIELD, "choices": CHOICES, "answer": FIELD, "label": FIELD, "preformatted": FIELD},
)


def check_loads(path: Path, name: str | None = None) -> None:
    """``path`` loads to well-typed questions, or raises one line naming it (and the row, for a row's fault)."""
    try:
        questions = load_questions(path)
    except CplError as error:
        assert str(error).startswith(f"{name or path}: ") and "\n" not in str(error)
        assert len(str(error)) < 1000
        return
    for question in questions:
        assert isinstance(question.id, str) and 0 < len(question.id) <= MAX_ID_CHARS
        assert isinstance(question.question, str) and 0 < len(question.question) <= MAX_TEXT_CHARS
        assert isinstance(question.choices, tuple) and len(question.choices) >= 2
        assert all(isinstance(c, str) and c and c != "None" and len(c) <= MAX_TEXT_CHARS for c in question.choices)
        assert type(question.answer) is int and 0 <= question.answer < len(question.choices)
        assert type(question.preformatted) is bool
        json.dumps(question.to_record(), ensure_ascii=False).encode("utf-8")


def _json_text(value: object) -> str:
    import sys

    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # the hostile file may hold what Python will not parse by default
    try:
        return json.dumps(value)
    finally:
        sys.set_int_max_str_digits(old)


@PROPERTY
@given(rows=st.lists(ROW, min_size=1, max_size=3))
def test_generated_rows_load_or_fail_in_one_line_as_jsonl_json_and_csv(rows):
    with tempfile.TemporaryDirectory() as folder:
        jsonl = Path(folder) / "q.jsonl"
        jsonl.write_text("".join(_json_text(row) + "\n" for row in rows))
        check_loads(jsonl)
        document = Path(folder) / "q.json"
        document.write_text(_json_text(rows))
        check_loads(document)
        table = Path(folder) / "q.csv"
        columns = sorted({key for row in rows for key in row})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: v if isinstance(v, str) else _json_text(v) for k, v in row.items()} for row in rows)
        table.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
        check_loads(table)


@PROPERTY
@given(row=ROW)
def test_generated_rows_load_or_fail_in_one_line_as_parquet_and_a_dataset_folder(row):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {k: v for k, v in row.items() if not (isinstance(v, int) and abs(v) >= 2**63)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.parquet"
        try:
            table = pa.Table.from_pylist([row])
            pq.write_table(table, path)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            assume(False)  # a row Arrow cannot hold (mixed lists, an empty struct): no such file exists
        check_loads(path)
        try:
            datasets.Dataset(table).save_to_disk(str(Path(folder) / "saved"))
        except Exception:  # a type datasets cannot hold (an empty struct): nothing to load
            return
        check_loads(Path(folder) / "saved")


# --- defects 15 and 20: the tracked text is read, decoded and judged before any model loads ---


@pytest.fixture
def run_files(tmp_path):
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in make_questions(3, 31, "i")])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in make_questions(3, 32, "m")])
    return inject, mastered


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model loads: every check on the tracked text must run before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracked text was checked")

    monkeypatch.setattr("cpl_masks.training.run.load_model", refuse)
    monkeypatch.setattr("cpl_masks.sweep.inputs.load_model", refuse)


BAD_TEXTS = [
    (b"caf\xe9 au lait", "is not valid UTF-8"),
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    (b"\xef\xbb\xbf", "is empty"),
]


@pytest.mark.parametrize("content, message", BAD_TEXTS)
@pytest.mark.parametrize("option", ["--track-text", "--retain-text"])
def test_a_bad_tracked_text_is_one_line_before_the_model_loads(tmp_path, run_files, no_model, content, message, option):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    inject, mastered = run_files
    args = ["train", "--inject", str(inject), "--mastered", str(mastered), "--out", str(tmp_path / "run")]
    args += ["--model", "tiny", "--method", "full", "--device", "cpu", option, str(text)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()  # the old spelling adds its one warning line
    assert [line for line in lines if not line.startswith("warning: --retain-text")] == [lines[-1]]
    assert lines[-1].startswith(f"error: --track-text {text}: ") and message in lines[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", BAD_TEXTS[:2])
def test_a_sweep_checks_its_tracked_text_before_the_model_loads(tmp_path, no_model, content, message):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    args = ["sweep", "--model", "tiny", "--data", "builtin:demo", "--out", str(tmp_path / "s"), "--track-text"]
    result = runner.invoke(app, [*args, str(text)])
    assert result.exit_code == 2, result.output
    assert f"--track-text {text}" in result.output and message in result.output and "Traceback" not in result.output


def test_an_unreadable_tracked_text_is_named(tmp_path):
    from cpl_masks.training.request import check_evaluation

    with pytest.raises(CplError, match="--track-text .*: no such file"):
        check_evaluation(1, str(tmp_path / "missing.txt"))
    with pytest.raises(CplError, match="--track-text .*: no such file"):
        check_evaluation(1, str(tmp_path))  # a folder


class NoBosTokenizer:
    """One token per character and no BOS token: a one-character text leaves nothing to predict."""

    bos_token_id = None
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + ord(c) % 50 for c in text]}


def test_a_text_with_no_token_of_loss_is_an_error_not_nan(tiny):
    from cpl_masks.evaluation.outcomes import text_loss

    with pytest.raises(CplError, match="no token to predict"):
        text_loss(tiny.model, NoBosTokenizer(), "x")
    with pytest.raises(CplError, match="no token to predict"):
        text_loss(tiny.model, tiny.tokenizer, "")
    assert math.isfinite(text_loss(tiny.model, NoBosTokenizer(), "xy"))


class FakeTrainer:
    """What :class:`RunEvaluation` uses of a trainer to score the tracked text."""

    def __init__(self, model=None):
        self.model, self.config = model, None

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()


def test_a_run_refuses_a_tracked_text_that_gives_no_loss_before_training(run_files, tmp_path):
    from cpl_masks.training.evaluation import RunEvaluation
    from cpl_masks.training.request import RunRequest

    text = tmp_path / "text.txt"
    text.write_text("x")
    inject, mastered = run_files
    request = RunRequest(str(inject), str(mastered), str(tmp_path / "run"), "m", mode="full", retain_text=str(text))
    with pytest.raises(CplError, match=f"^--track-text {_escape(str(text))}: .*no token to predict"):
        RunEvaluation(request, FakeTrainer(), NoBosTokenizer(), None, None, "fp")


def test_a_non_finite_tracked_loss_stops_the_run_instead_of_writing_nan(tiny, run_files, tmp_path, monkeypatch):
    import cpl_masks.training.evaluation as evaluation
    from cpl_masks.training.request import RunRequest

    text = tmp_path / "text.txt"
    text.write_text("the sun is red")
    inject, mastered = run_files
    request = RunRequest(str(inject), str(mastered), str(tmp_path / "run"), "m", mode="full", retain_text=str(text))
    run = evaluation.RunEvaluation(request, FakeTrainer(tiny.model), tiny.tokenizer, None, None, "fp")
    assert math.isfinite(run.retain_loss())
    monkeypatch.setattr(evaluation, "text_loss", lambda *args, **kwargs: float("nan"))
    with pytest.raises(CplError, match=f"^--track-text {_escape(str(text))}: the loss is nan"):
        run.retain_loss()
