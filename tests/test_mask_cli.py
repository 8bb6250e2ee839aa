"""The mask commands end to end on the tiny model: profile, inspect, diff, combine, threshold."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.masks.format import Mask
from tests.conftest import make_questions

runner = CliRunner()


@pytest.fixture
def split_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    folder = tmp_path / "split"
    folder.mkdir()
    for name, rows in (
        ("mastered", make_questions(6, seed=3, prefix="m")),
        ("inject", make_questions(5, seed=4)),
    ):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(q.to_record()) + "\n" for q in rows))
    return folder


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def profile_args(split_dir, model_dir, *extra: str) -> list[str]:
    return [
        "profile",
        "--model",
        model_dir,
        "--mastered",
        split_dir / "mastered.jsonl",
        "--inject",
        split_dir / "inject.jsonl",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def test_profile_inspect_diff_combine_threshold(split_dir, tiny_model_dir, tmp_path):
    first = tmp_path / "a.safetensors"
    result = invoke(*profile_args(split_dir, tiny_model_dir, "--save-scores", "--out", first, "--name", "facts"))
    assert result.exit_code == 0, result.output
    mask = Mask.load(first)
    assert mask.scores is not None and mask.metadata["scoring"] == "letter"
    assert f"mask {mask.id[:12]}" in result.output and "registered as" in result.output
    assert "peak memory" in result.output

    inspected = invoke("inspect", first, "--json", "--plot", tmp_path / "shares.png")
    assert inspected.exit_code == 0, inspected.output
    payload = json.loads(inspected.output)
    assert payload["id"] == mask.id
    assert payload["summary"]["overall"]["collaborative"] == mask.collaborative_count()
    assert payload["summary"]["overall"]["touched_share"] is not None
    assert (tmp_path / "shares.png").read_bytes()[:4] == b"\x89PNG"
    table = invoke("inspect", first)
    assert table.exit_code == 0 and "by module type" in table.output
    rows = {line.split("│")[1].strip(): line for line in table.output.splitlines() if line.startswith("│")}
    for module, group in payload["summary"]["by_module"].items():  # every module type, with its share
        assert f"{group['share']:.1%}" in rows[module]

    same = invoke("diff", first, first, "--json")
    assert same.exit_code == 0, same.output
    assert json.loads(same.output)["overall"]["agreement"] == 1.0

    cut = tmp_path / "cut.safetensors"
    recut = invoke("threshold", first, "--keep-fraction", "0.2", "-o", cut)
    assert recut.exit_code == 0, recut.output
    assert Mask.load(cut).metadata["parents"] == [mask.id] and Mask.load(cut).metadata["recut_of"] == mask.id
    assert Mask.load(cut).collaborative_count() == math.ceil(0.2 * mask.entries)

    both = tmp_path / "both.safetensors"
    combined = invoke("combine", "--op", "and", first, cut, "-o", both)
    assert combined.exit_code == 0, combined.output
    assert Mask.load(both).metadata["parents"] == [mask.id, Mask.load(cut).id]
    assert Mask.load(both).collaborative_count() <= Mask.load(cut).collaborative_count()


def test_profile_without_out_lands_in_the_registry(split_dir, tiny_model_dir):
    result = invoke(*profile_args(split_dir, tiny_model_dir, "--name", "facts", "--keep-fraction", "0.5"))
    assert result.exit_code == 0, result.output
    name = result.output.split("registered as")[-1].split()[0]
    inspected = invoke("inspect", name, "--json")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["metadata"]["rule"]["keep_fraction"] == 0.5


def test_profile_reads_the_scoring_from_split_json(split_dir, tiny_model_dir, tmp_path):
    (split_dir / "split.json").write_text(json.dumps({"scoring": "loglik"}))
    result = invoke(*profile_args(split_dir, tiny_model_dir, "--out", tmp_path / "m.safetensors"))
    assert result.exit_code == 0, result.output
    assert Mask.load(tmp_path / "m.safetensors").metadata["scoring"] == "loglik"
    (split_dir / "split.json").write_text("{not json")
    broken = invoke(*profile_args(split_dir, tiny_model_dir, "--out", tmp_path / "other.safetensors"))
    assert broken.exit_code == 2 and "split.json: cannot read its 'scoring'" in broken.output


def no_model_loads(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cpl_masks.cli.profile.load_model", refuse)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--threshold", "0", "--keep-fraction", "0.3"), "give exactly one of --threshold and --keep-fraction"),
        (("--keep-fraction", "1.5"), "--keep-fraction 1.5: must be in (0, 1]"),
        (("--freeze-pattern", "("), "--freeze-pattern '(': not a valid regular expression"),
        (("--scoring", "foo"), "--scoring foo: choose one of letter, loglik, loglik-norm"),
    ],
)
def test_profile_refuses_a_bad_rule_or_scoring_before_loading_a_model(
    split_dir, tiny_model_dir, monkeypatch, options, message
):
    no_model_loads(monkeypatch)
    result = invoke(*profile_args(split_dir, tiny_model_dir, *options))
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output


def test_threshold_refuses_a_bad_cut_before_reading_the_mask(tmp_path, monkeypatch):
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    result = invoke("threshold", tmp_path / "missing.safetensors", "--keep-fraction", "2")
    assert result.exit_code == 2, result.output
    assert "--keep-fraction 2.0: must be in (0, 1]" in result.output and "missing" not in result.output


def test_threshold_needs_scores_and_one_rule(split_dir, tiny_model_dir, tmp_path):
    plain = tmp_path / "plain.safetensors"
    assert invoke(*profile_args(split_dir, tiny_model_dir, "--out", plain)).exit_code == 0
    no_scores = invoke("threshold", plain, "--threshold", "0.1", "-o", tmp_path / "x.safetensors")
    assert no_scores.exit_code == 2 and "--save-scores" in no_scores.output
    neither = invoke("threshold", plain, "-o", tmp_path / "x.safetensors")
    assert neither.exit_code == 2 and "exactly one" in neither.output


def test_mask_inputs_report_bad_files_in_one_line(split_dir, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 3)
    cases = {
        ("inspect", broken): f"error: {broken}: not a safetensors file (only 3 bytes; truncated?)",
        ("diff", "nope", "nope"): "error: mask nope: no such file, registered name or id",
    }
    for args, message in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1


def test_threshold_refuses_non_finite_scores_of_an_old_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from cpl_masks.masks.format import read_header

    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    bits = {"w": torch.tensor([True, False, True])}
    path = Mask.from_bool(bits, {"parents": []}, {"w": torch.tensor([1.0, -1.0, 0.5])}).save(tmp_path / "m.safetensors")
    header = read_header(path)
    del header["metadata"]["scores_sha256"]  # written before scores were hashed
    tensors = {"w": Mask.load(path).packed["w"], "scores/w": torch.tensor([1.0, -1.0, float("nan")]).bfloat16()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"cpl_mask": json.dumps(header)})
    result = invoke("threshold", tmp_path / "old.safetensors", "--threshold", "0.1", "-o", tmp_path / "cut.safetensors")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert f"{tmp_path / 'old.safetensors'}: the stored scores of w are not all finite" in result.output
    assert not (tmp_path / "cut.safetensors").exists()
