"""The sweep: every method through the one loop, judged at its best learning rate, resumable."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.registry import Registry
from cpl_masks.registry.names import mask_name
from cpl_masks.sweep.config import DEFAULT_METHODS, SweepConfig
from cpl_masks.sweep.report import aggregate, best_per_method, pareto_front, sweep_table_rows
from cpl_masks.sweep.run import run_sweep
from tests.conftest import make_questions, write_rows


@pytest.fixture
def data_file(tmp_path):
    return write_rows(tmp_path / "quiz.jsonl", [q.to_record() for q in make_questions(40, seed=5)])


def config_for(tiny_model_dir, data_file, out, **overrides) -> SweepConfig:
    values = {
        "model": str(tiny_model_dir),
        "data": str(data_file),
        "out": str(out),
        "methods": ["full", "mask"],
        "lr_grid": [1e-3, 1e-1],
        "epochs": 1,
        "threads": 1,
        "holdout_fraction": 0.3,
        **overrides,
    }
    return SweepConfig(**values)


def test_every_method_runs_through_the_sweep_and_is_reported(tiny_model_dir, data_file, tmp_path):
    retain = tmp_path / "retain.txt"
    retain.write_text("the capital of france is paris . the sun is red . " * 4)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--lr-grid",
            "0.01",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--holdout-fraction",
            "0.3",
            "--track-text",
            str(retain),
            "--forgetting-budget",
            "1.0",
            "--ewc-lambda",
            "1",  # EWC's step on an entry is lr·2λF: too stiff a penalty oscillates and diverges
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "sweep.json").read_text())
    assert [run["method"] for run in payload["runs"]] == list(DEFAULT_METHODS)
    assert set(payload["best"]) == set(DEFAULT_METHODS)  # budget 1.0: every method qualifies
    assert all(payload["best"][method] is not None for method in DEFAULT_METHODS)
    for method in DEFAULT_METHODS:
        assert f"│ {method}" in result.output  # a row of the table
    count = len(DEFAULT_METHODS)
    assert f"[run 1/{count}] full lr=0.01 seed=0" in result.output and f"[run {count}/{count}] ewc" in result.output
    assert "left" in result.output  # the time estimate once a run has finished
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for run in payload["runs"]:
        saved = json.loads((out / "runs" / f"{run['method']}-lr0.01-s0" / "run.json").read_text())
        assert saved["baseline_source"] == "split"  # epoch 0 was read from the split, not scored again
        assert saved["model_dir"] is None and not (out / "runs" / f"{run['method']}-lr0.01-s0" / "checkpoint").exists()
        assert run["retain_loss_delta"] is not None and set(run["delta_logprob"]) == {"inject", "mastered", "heldout"}
    mask_run = next(run for run in payload["runs"] if run["method"] == "mask")
    assert 0.0 <= mask_run["mask_agreement"]["touched"] <= 1.0
    shares = {name: entry["collaborative_share"] for name, entry in payload["masks"].items()}
    assert shares["random-s0"] == shares["gradient-magnitude"] == shares["mask"]


def test_epoch_zero_equals_the_splits_scores(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    payload = run_sweep(config_for(tiny_model_dir, data_file, out, methods=["full"], lr_grid=[1e-3]), report=print)
    run = json.loads((out / "runs" / "full-lr0.001-s0" / "run.json").read_text())
    scores = {row["id"]: row for row in map(json.loads, (out / "split" / "scores.jsonl").read_text().splitlines())}
    mastered = [json.loads(line)["id"] for line in (out / "split" / "mastered.jsonl").read_text().splitlines()]
    assert run["metrics"][0]["totals"]["mastered_right"] == sum(scores[key]["correct"] for key in mastered)
    assert payload["runs"][0]["learned"] == run["final"]["learned"]


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    config = config_for(tiny_model_dir, data_file, out)
    lines: list[str] = []

    def kill_at_second_run(line: str) -> None:
        lines.append(line)
        if line.startswith("[run 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, report=kill_at_second_run, show_progress=False)
    first = out / "runs" / "full-lr0.001-s0" / "run.json"
    finished_at = first.stat().st_mtime_ns
    assert not (out / "runs" / "full-lr0.1-s0").exists()
    partial = json.loads((out / "sweep.json").read_text())  # written after every run
    assert partial["complete"] is False and len(partial["runs"]) == 1
    lines.clear()
    payload = run_sweep(config, report=lines.append, show_progress=False)
    assert first.stat().st_mtime_ns == finished_at  # not redone
    assert not any(line.startswith("profiling") or line.startswith("splitting") for line in lines)
    assert len(payload["runs"]) == 4 and all(run["learned_share"] is not None for run in payload["runs"])
    assert payload["complete"] is True


def test_a_sweep_folder_moved_elsewhere_reads_the_same(tiny_model_dir, data_file, tmp_path):
    """Runs are found where they lie, not where they were trained: a moved sweep folder (or runs another
    process trained and that were moved in) is judged again without training, its pairs intact."""
    first = run_sweep(config_for(tiny_model_dir, data_file, tmp_path / "sweep", lr_grid=[1e-1]), show_progress=False)
    shutil.move(tmp_path / "sweep", tmp_path / "moved")
    lines: list[str] = []
    again = run_sweep(config_for(tiny_model_dir, data_file, tmp_path / "moved", lr_grid=[1e-1]), report=lines.append)
    assert not any(line.startswith(("splitting", "profiling")) for line in lines)
    assert [run["run_dir"] for run in again["runs"]] == ["runs/full-lr0.1-s0", "runs/mask-lr0.1-s0"]
    assert again["paired_final"] and again["paired_final"] == first["paired_final"]


def test_a_sweep_folder_refuses_other_arguments(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(config_for(tiny_model_dir, data_file, out, methods=["full"], lr_grid=[1e-3]), show_progress=False)
    with pytest.raises(CplError, match=r"holds a sweep with other arguments \(epochs\)"):
        run_sweep(config_for(tiny_model_dir, data_file, out, methods=["full"], lr_grid=[1e-3], epochs=2))
    lines: list[str] = []
    again = config_for(tiny_model_dir, data_file, out, methods=["full"], lr_grid=[1e-3], forgetting_budget=1.0)
    payload = run_sweep(again, report=lines.append)  # another budget judges the same runs again
    assert payload["config"]["forgetting_budget"] == 1.0 and payload["best"]["full"] is not None
    assert not any(line.startswith(("splitting", "profiling")) for line in lines)


def test_a_sweep_grows_by_seeds_and_methods_on_its_split_and_masks(tiny_model_dir, data_file, tmp_path):
    """More seeds or methods on a finished sweep (or other seeds on a copy of its folder) train only the
    new runs, on the same split and CPL mask, and the report covers every run the newest command names."""
    out = tmp_path / "sweep"
    run_sweep(config_for(tiny_model_dir, data_file, out, lr_grid=[1e-3]), show_progress=False)
    first, mask = out / "runs" / "full-lr0.001-s0" / "run.json", out / "masks" / "cpl.safetensors"
    stamps = first.stat().st_mtime_ns, mask.stat().st_mtime_ns
    lines: list[str] = []
    grown = config_for(tiny_model_dir, data_file, out, lr_grid=[1e-3], seeds=[0, 1], methods=["full", "mask", "random"])
    payload = run_sweep(grown, report=lines.append, show_progress=False)
    assert (first.stat().st_mtime_ns, mask.stat().st_mtime_ns) == stamps
    assert not any(line.startswith(("splitting", "profiling")) for line in lines)
    assert sorted(run["run_dir"] for run in payload["runs"]) == [
        f"runs/{method}-lr0.001-s{seed}" for method in ("full", "mask", "random") for seed in (0, 1)
    ]
    assert payload["complete"] is True
    assert json.loads((out / "sweep_config.json").read_text())["seeds"] == [0, 1]
    shutil.copytree(out, tmp_path / "copy", ignore=shutil.ignore_patterns("runs"))
    elsewhere = run_sweep(
        config_for(tiny_model_dir, data_file, tmp_path / "copy", lr_grid=[1e-3], seeds=[2]), report=lines.append
    )
    assert [run["run_dir"] for run in elsewhere["runs"]] == ["runs/full-lr0.001-s2", "runs/mask-lr0.001-s2"]
    assert not any(line.startswith(("splitting", "profiling")) for line in lines)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ["full", "nope"]}, "--methods nope: choose among"),
        ({"methods": ["reuse:/no/such.safetensors"]}, "no such mask file"),
        ({"lr_grid": [0.0]}, "--lr-grid"),
        ({"forgetting_budget": 2.0}, "--forgetting-budget"),
        ({"holdout_fraction": 0.0}, "held-out share"),
        ({"method_options": {"ewc_lambda": 5.0}}, "--ewc-lambda: none of the swept methods takes it"),
        ({"keep_fraction_grid": [1.0]}, "--keep-fraction-grid"),
        ({"methods": ["mask", "random"], "method_options": {"reprofile_every": 2}}, "a control mask has no rule"),
        ({"method_options": {"reprofile_every": 2}, "optimizer": "adamw"}, "--reprofile-every runs with --optimizer"),
        ({"methods": ["full"], "keep_fraction_grid": [0.5]}, "--keep-fraction-grid: needs a mask method"),
    ],
)
def test_bad_sweep_options_fail_before_any_work(tiny_model_dir, data_file, tmp_path, overrides, message):
    out = tmp_path / "sweep"
    with pytest.raises(CplError, match=message):
        run_sweep(config_for(tiny_model_dir, data_file, out, **overrides))
    assert not out.exists()


def point(method: str, lr: float, learned: float, forgotten: float, diverged: bool = False) -> dict:
    return {
        "method": method,
        "lr": lr,
        "seeds": 1,
        "learned_share": learned,
        "heldout_forgotten_share": forgotten,
        "forgotten_share": forgotten,
        "delta_logprob": {"heldout": -forgotten},
        "delta_margin": {"heldout": -forgotten},
        "diverged": diverged,
    }


def test_each_method_is_judged_at_its_best_rate_within_the_budget():
    points = [
        point("full", 1e-4, 0.2, 0.0),
        point("full", 1e-3, 0.9, 0.3),  # learns most but forgets past the budget
        point("mask", 1e-4, 0.1, 0.0),
        point("mask", 1e-3, 0.5, 0.0),
        point("lora", 1e-3, 0.0, 0.5),
        point("lora", 1e-2, 0.0, 0.0, diverged=True),
    ]
    best = best_per_method(points, budget=0.02)
    assert (best["full"]["lr"], best["mask"]["lr"], best["lora"]) == (1e-4, 1e-3, None)
    front = pareto_front(points)
    assert [(p["method"], p["lr"]) for p in front] == [("mask", 1e-3), ("full", 1e-3)]
    rows = sweep_table_rows({"best": best})
    assert rows[2] == ("lora", "none within budget", *["-"] * 8)


def test_points_average_seeds_and_a_diverged_seed_marks_the_point():
    runs = [
        {"method": "full", "lr": 1e-3, "seed": seed, "learned_share": learned, "heldout_forgotten_share": 0.0,
         "forgotten_share": 0.1, "retain_loss_delta": 0.5, "time_s": 1.0, "delta_logprob": {"heldout": -1.0},
         "delta_margin": {"heldout": 0.0}, "mask_agreement": None}
        for seed, learned in ((0, 0.2), (1, 0.4))
    ]  # fmt: skip
    runs.append({"method": "full", "lr": 1e-1, "seed": 0, "learned_share": None, "diverged": "loss nan"})
    points = {p["lr"]: p for p in aggregate(runs)}
    assert points[1e-3]["learned_share"] == pytest.approx(0.3)
    assert points[1e-3]["learned_share_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert points[1e-1]["diverged"] is True


def test_control_masks_in_a_sweep_keep_the_cpl_share_per_tensor(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(
        config_for(tiny_model_dir, data_file, out, methods=["mask", "random"], lr_grid=[1e-3], seeds=[0, 1]),
        show_progress=False,
    )
    cpl = Mask.load(out / "masks" / "cpl.safetensors")
    randoms = [Mask.load(out / "masks" / f"random-s{seed}.safetensors") for seed in (0, 1)]
    assert randoms[0].id != randoms[1].id
    for name in cpl.names:
        assert all(mask.collaborative_count(name) == cpl.collaborative_count(name) for mask in randoms)


def test_control_masks_never_take_the_cpl_masks_name(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    methods = ["mask", "random", "gradient-magnitude"]
    run_sweep(config_for(tiny_model_dir, data_file, out, methods=methods, lr_grid=[1e-3]), show_progress=False)
    cpl = Mask.load(out / "masks" / "cpl.safetensors", scores=False)
    cpl_name = mask_name(cpl.metadata, None)
    assert cpl_name.endswith("/quiz")
    registry = Registry()
    for control in ("random-s0", "gradient-magnitude"):
        mask = Mask.load(out / "masks" / f"{control}.safetensors", scores=False)
        assert mask_name(mask.metadata, None) == f"{cpl_name}-{control.removesuffix('-s0')}"
        assert registry.resolve(mask.id) is not None  # its run registered it
    assert Mask.load(registry.resolve(cpl_name), scores=False).id == cpl.id  # `train --mask <model>/<task>` gets CPL's


def test_a_keep_fraction_grid_runs_each_mask_method_at_each_share_paired_with_random(
    tiny_model_dir, data_file, tmp_path
):
    out = tmp_path / "sweep"
    config = config_for(
        tiny_model_dir, data_file, out, methods=["full", "mask", "random"], lr_grid=[1e-3], keep_fraction_grid=[0.5]
    )
    assert config.swept_methods() == ["full", "mask", "mask@0.5", "random", "random@0.5"]
    payload = run_sweep(config, show_progress=False)
    cpl = Mask.load(out / "masks" / "cpl.safetensors", scores=False)
    half = Mask.load(out / "masks" / "cpl@0.5.safetensors", scores=False)
    assert half.metadata["rule"]["keep_fraction"] == 0.5 and half.metadata["recut_of"] == cpl.id
    assert abs(half.collaborative_share() - 0.5) < 1e-4
    random_half = Mask.load(out / "masks" / "random-s0@0.5.safetensors", scores=False)
    assert all(random_half.collaborative_count(name) == half.collaborative_count(name) for name in half.names)
    for method, mask in (("mask@0.5", half), ("random@0.5", random_half)):
        run = json.loads((out / "runs" / f"{method}-lr0.001-s0" / "config.json").read_text(encoding="utf-8"))
        assert run["mask_id"] == mask.id
    assert {"mask vs random", "mask@0.5 vs random@0.5", "mask@0.5 vs full"} <= set(payload["paired_final"])
    assert "mask@0.5 vs random" not in payload["paired_final"]
    assert Mask.load(Registry().resolve(mask_name(cpl.metadata, None)), scores=False).id == cpl.id


def test_a_retain_set_runs_in_a_sweep_paired_with_full_the_dynamic_rule_and_random_signs(
    tiny_model_dir, data_file, tmp_path
):
    from cpl_masks.models import load_model
    from cpl_masks.profiling.retain import profile_retain

    kept = make_questions(6, seed=77, prefix="k")  # questions of another task: a retain set reused here
    loaded = load_model(str(tiny_model_dir), device="cpu", threads=1)
    path = profile_retain(loaded, kept, scoring="loglik", show_progress=False).save(tmp_path / "general.safetensors")
    with pytest.raises(CplError, match="is a retain set; name it as retain:"):
        config_for(tiny_model_dir, data_file, tmp_path / "refused", methods=["full", f"reuse:{path}"]).check()
    out = tmp_path / "sweep"
    methods = ["full", "dynamic", "random-signs", f"retain:{path}"]
    config = config_for(tiny_model_dir, data_file, out, methods=methods, lr_grid=[1e-2])
    payload = run_sweep(config, show_progress=False)
    run = json.loads((out / "runs" / "retain-general-lr0.01-s0" / "run.json").read_text(encoding="utf-8"))
    assert run["mode"] == "dynamic" and run["mask_id"] == Mask.load(path).id
    paired = set(payload["paired_final"])
    assert {"retain-general vs full", "retain-general vs dynamic", "retain-general vs random-signs"} <= paired
    assert {"dynamic vs full", "dynamic vs random-signs", "random-signs vs full"} <= paired
    assert not {"dynamic vs dynamic", "full vs dynamic", "random-signs vs random-signs"} & paired
