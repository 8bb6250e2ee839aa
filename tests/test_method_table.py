"""The methods table is the one place a method is declared: its options reach `train` and `sweep` from it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app, build_app
from cpl_masks.methods import METHODS, Method, MethodContext, MethodSpec, option, option_fields
from tests.conftest import make_questions, write_rows


@dataclass
class ToyOptions:
    toy_scale: float = option(0.5, "share of each step's gradient to take")


class ScaledSteps(Method):
    """Plain fine-tuning that takes a share of every step: the smallest method with an option."""

    name = "toy"

    def __init__(self, context: MethodContext, options: ToyOptions) -> None:
        self.scale = options.toy_scale

    def mask_gradients(self, model: torch.nn.Module) -> None:
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(self.scale)


def help_of(application, command: str, option_name: str) -> str:
    """The help text of ``option_name`` in ``command --help``, whitespace and table borders folded."""
    result = CliRunner().invoke(application, [command, "--help"], env={"COLUMNS": "200"})
    lines = [line.strip("│ ") for line in result.output.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(option_name))
    text = [lines[start][len(option_name) :]]
    for line in lines[start + 1 :]:
        if line.startswith("-") or not line.strip():
            break
        text.append(line)
    return re.sub(r"\s+", " ", " ".join(text).replace("<float>", "").replace("<int>", "")).strip()


def test_each_method_option_is_declared_once_and_offered_alike_by_train_and_sweep():
    fields = {field.name: field for field in option_fields()}
    assert fields["lora_rank"].default == 8 and fields["refresh_every"].methods == ("dynamic", "random-signs", "agem")
    for name in ("--lora-rank", "--refresh-every", "--ewc-lambda", "--replay-share"):
        assert help_of(app, "train", name) == help_of(app, "sweep", name) != ""
    assert "(default 8)" in help_of(app, "train", "--lora-rank")


def test_a_new_method_is_one_class_and_one_table_entry(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "toy", MethodSpec(ScaledSteps, ToyOptions, "a share of every step"))
    application = build_app()
    assert "(default 0.5)" in help_of(application, "train", "--toy-scale")
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in make_questions(4, 91, "i")])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in make_questions(4, 92, "m")])
    train = ["train", "--model", str(tiny_model_dir), "--inject", str(inject), "--mastered", str(mastered),
             "--method", "toy", "--toy-scale", "0.25", "--epochs", "1", "--out", str(tmp_path / "run"),
             "--device", "cpu", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(application, train)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["method"]["name"] == "toy" and run["method"]["options"] == {"toy_scale": 0.25}
    data = write_rows(tmp_path / "quiz.jsonl", [q.to_record() for q in make_questions(30, seed=5)])
    sweep = ["sweep", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "sweep"),
             "--methods", "full,toy", "--toy-scale", "0.25", "--lr-grid", "0.01", "--epochs", "1",
             "--threads", "1", "--holdout-fraction", "0.3"]  # fmt: skip
    result = CliRunner().invoke(application, sweep)
    assert result.exit_code == 0, result.output
    toy_run = json.loads((tmp_path / "sweep" / "runs" / "toy-lr0.01-s0" / "run.json").read_text())
    assert toy_run["method"]["options"] == {"toy_scale": 0.25}
