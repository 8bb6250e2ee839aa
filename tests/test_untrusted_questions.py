"""Question files from anywhere: generated rows load as questions or fail as one CplError naming the row."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpl_masks.data.questions import load_questions
from cpl_masks.errors import CplError
from tests.conftest import make_questions, write_rows

PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GOOD = {"question": "What is the capital of France?", "choices": ["Paris", "Rome"], "answer": "A"}


def test_json_nested_5000_deep_is_a_one_line_error(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    path = write_rows(tmp_path / "deep.jsonl", [GOOD, '{"question": "q", "choices": ' + deep + ', "answer": 0}'])
    with pytest.raises(CplError, match=r"deep.jsonl: row 2: JSON nested too deeply"):
        load_questions(path)
    document = tmp_path / "deep.json"
    document.write_text(deep)
    with pytest.raises(CplError, match="deep.json: JSON nested too deeply"):
        load_questions(document)


def test_lone_surrogate_is_named_as_such(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [GOOD, '{"question": "what \\ud800?", "choices": ["a", "b"], "answer": 0}'])
    with pytest.raises(CplError, match=r"q.jsonl: row 2: a string holds a lone surrogate \(\\ud800\)"):
        load_questions(path)


def test_rewritten_file_with_the_old_size_and_mtime_is_read_again(tmp_path):
    """``datasets`` keys local files by mtime: a same-size rewrite with the old mtime must not give old answers."""
    rows = [q.to_record() for q in make_questions(6)]
    for suffix in (".jsonl", ".csv"):
        path = tmp_path / f"q{suffix}"
        swapped = [{**row, "answer": "B" if row["answer"] == "A" else "A"} for row in rows]
        for version in (rows, swapped):
            if suffix == ".csv":
                with open(path, "w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(["id", "question", "choices", "answer"])
                    writer.writerows([r["id"], r["question"], json.dumps(r["choices"]), r["answer"]] for r in version)
            else:
                write_rows(path, version)
            if version is rows:
                stat = path.stat()
                first = [q.answer_letter for q in load_questions(path)]
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
        again = [q.answer_letter for q in load_questions(path)]
        assert again == [row["answer"] for row in swapped] != first, suffix


def test_a_superscript_digit_answer_is_refused_not_crashed(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [{**GOOD, "answer": "²"}, {**GOOD, "answer": "--1"}])
    with pytest.raises(CplError, match="row 1: answer '²' is neither a letter"):
        load_questions(path)


TEXT = st.text(max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)
ANSWER = st.sampled_from(["A", "b", " C ", "0", "1", "-1", "7", "²", "Paris", 0, 1, 2.0, 2.5, True, None]) | JSON
CHOICES = st.lists(TEXT, max_size=5) | st.dictionaries(st.just("text"), st.lists(TEXT, max_size=4)) | JSON
ROW = st.fixed_dictionaries(
    {},
    optional={
        "id": st.none() | TEXT | st.integers(),
        "question": TEXT | JSON,
        "choices": CHOICES,
        "answer": ANSWER,
        "label": ANSWER,
        "preformatted": JSON,
    },
)
LINE = ROW.map(json.dumps) | JSON.map(json.dumps) | TEXT | st.just("") | st.just('{"question": "\\udc00"}')


def check_loads(path: Path) -> None:
    try:
        questions = load_questions(path)
    except CplError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    for question in questions:
        assert 0 <= question.answer < len(question.choices)
        json.dumps(question.to_record(), ensure_ascii=False).encode("utf-8")


@PROPERTY
@given(lines=st.lists(LINE, min_size=1, max_size=5))
def test_generated_jsonl_rows_load_or_raise_cpl_error(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        check_loads(path)


@PROPERTY
@given(document=st.lists(ROW, max_size=4) | JSON)
def test_generated_json_documents_load_or_raise_cpl_error(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        check_loads(path)


@PROPERTY
@given(data=st.binary(max_size=120))
def test_generated_bytes_load_or_raise_cpl_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "q.jsonl"
        path.write_bytes(data)
        check_loads(path)
