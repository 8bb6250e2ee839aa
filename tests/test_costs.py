"""``cpl-masks fits``: a run's peak memory predicted from the measured lines, before anything loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.models import load_model
from cpl_masks.training import costs
from cpl_masks.training.costs import Line, count_parameters, method_bytes, plan, variant

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "experiments" / "results" / "method-costs"
GIB = 2**30


def test_every_measured_combination_has_its_variant():
    assert variant("full", "adamw") == "adamw-full" and variant("full", "sgd") == "sgd-full"
    assert variant("mask", "adamw", share=0.5) == "adamw-mask-0.5" and variant("mask", "sgd") == "sgd-mask-0.5"
    assert variant("dynamic", "sgd") == "per-step-refresh" and variant("lora", "adamw", lora_rank=16) == "lora-r16"


@pytest.mark.parametrize(
    ("method", "optimizer", "message"),
    [("ewc", "sgd", "not measured"), ("dynamic", "adamw", "not measured"), ("mask", "adamw", "--share")],
)
def test_an_unmeasured_combination_is_refused_in_one_line(method, optimizer, message):
    with pytest.raises(CplError, match=message):
        variant(method, optimizer)


def test_masked_adamw_between_measured_shares_is_interpolated():
    table = {
        ("float32", "adamw-full"): Line(12.0, 0.0),
        ("float32", "adamw-mask-0.25"): Line(6.0, 0.0),
        ("float32", "adamw-mask-0.5"): Line(8.0, 0.0),
        ("float32", "adamw-mask-0.75"): Line(10.0, 0.0),
    }
    at = {share: method_bytes(100, f"adamw-mask-{share}", "float32", table) for share in (0.1, 0.25, 0.6, 0.75, 0.9)}
    assert at[0.25] == 600 and at[0.75] == 1000 and at[0.6] == 880 and at[0.9] == 1120
    assert at[0.1] == at[0.25]  # below the smallest measured share: that share's cost, never less
    with pytest.raises(CplError, match="--share 1.5"):
        method_bytes(100, "adamw-mask-1.5", "float32", table)


def test_parameters_are_counted_from_the_config_without_loading_weights(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert count_parameters(str(tiny_model_dir)) == sum(p.numel() for p in loaded.model.parameters())
    assert count_parameters(str(Path(tiny_model_dir) / "config.json")) == count_parameters(str(tiny_model_dir))


def test_a_plan_fits_when_the_device_has_the_weights_and_the_methods_peak(monkeypatch):
    monkeypatch.setitem(costs.MEASURED, ("float32", "sgd-full"), Line(4.5, GIB))
    monkeypatch.setattr(costs, "device_memory", lambda device: ("cpu", 20 * GIB))
    small, large = (plan("any", "full", "sgd", parameters=n) for n in (2 * 10**9, 3 * 10**9))
    assert small.weights_bytes == 8 * 10**9 and small.method_bytes == 9 * 10**9 + GIB
    assert small.fits and not large.fits


def test_the_command_says_whether_a_run_fits_and_exits_1_when_not(monkeypatch):
    monkeypatch.setitem(costs.MEASURED, ("float32", "lora-r8"), Line(1.0, 0.0))
    monkeypatch.setattr(costs, "device_memory", lambda device: ("cpu", 10 * GIB))
    runner = CliRunner()
    fits = runner.invoke(app, ["fits", "--method", "lora", "--optimizer", "adamw", "--parameters", "1e9"])
    assert fits.exit_code == 0 and "fits, with" in fits.output and "predicted peak" in fits.output
    short = runner.invoke(app, ["fits", "--method", "lora", "--optimizer", "adamw", "--parameters", "3e9"])
    assert short.exit_code == 1 and "does not fit" in short.output
    refused = runner.invoke(app, ["fits", "--method", "ewc", "--parameters", "1e9"])
    assert refused.exit_code == 2 and refused.output.startswith("error: --method ewc")


@pytest.mark.skipif(not RECORDS.is_dir(), reason="no benchmark records")
def test_the_shipped_lines_are_the_fit_of_the_benchmark_records():
    spec = importlib.util.spec_from_file_location("method_costs", ROOT / "experiments" / "speed" / "method_costs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    rows = module.read_records(RECORDS)
    for (dtype, name), line in costs.MEASURED.items():
        slope, constant = module.fitted([row for row in rows if row["dtype"] == dtype and row["variant"] == name])
        assert line.bytes_per_parameter == pytest.approx(slope, abs=1e-3)
        assert line.constant_bytes == pytest.approx(constant, rel=1e-3, abs=1e3)
    assert {name for _, name in costs.MEASURED} == set(module.VARIANTS)
