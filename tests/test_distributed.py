"""Two gloo processes on the CPU: masks and steps equal the single-process ones, rank 0 alone writes,
and a failing rank stops every rank with a one-line error instead of a hang."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpl_masks.masks import Mask
from cpl_masks.methods import MethodContext
from cpl_masks.methods.masking import StaticMask
from cpl_masks.models import load_model, model_fingerprint
from cpl_masks.profile import mean_gradients, profile
from cpl_masks.scoring import make_scorer
from cpl_masks.train import TrainConfig, Trainer
from tests.conftest import make_questions, write_rows

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

ROOT = Path(__file__).resolve().parents[1]
MASTERED = make_questions(9, seed=11, prefix="m")
INJECT = make_questions(7, seed=12, prefix="i")
STEP = make_questions(5, seed=13, prefix="s")  # one step of batch 5: rank 0 takes 3 questions, rank 1 takes 2
WRAPPINGS = ("ddp", "fsdp2")
OPTIMIZERS = {"sgd": 0.05, "adamw": 1e-3}  # learning rates
# Absolute tolerance against the single-process step. Adam's first step moves an entry by
# lr·g/(|g|+ε): where |g| is near ε it magnifies the float noise of summing g in another order
# (per-rank sums, then all-reduce) by up to 1/ε, so AdamW is held to 1 % of a step, SGD to 1e-6.
TOLERANCE = {"sgd": 1e-6, "adamw": 1e-2 * OPTIMIZERS["adamw"]}
LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh(model_dir: Path):
    return load_model(str(model_dir), device="cpu", threads=1)


def spawn(task: str, *args: object) -> None:
    """Run ``task`` (a function of this module) on 2 ranks of a gloo group; fail on any rank's error."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    context = torch.multiprocessing.start_processes(
        _rank_main, args=(task, *args), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{task}: the ranks did not finish within {LAUNCH_TIMEOUT_S} s")


def _rank_main(rank: int, task: str, *args: object) -> None:
    from cpl_masks import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.setup("cpu")
    globals()[task](*args)
    torch.distributed.destroy_process_group()


def profile_both(model_dir: str, out: str) -> None:
    """Profile a fresh model under each wrapping; rank 0 saves each mask (ranks must agree)."""
    from cpl_masks import distributed

    for wrapping in WRAPPINGS:
        mask = profile(fresh(model_dir), MASTERED, INJECT, batch_size=2, show_progress=False, wrapping=wrapping)
        ids = [None, None]
        torch.distributed.all_gather_object(ids, mask.id)
        assert ids[0] == ids[1], f"{wrapping}: the ranks made different masks"
        if distributed.is_main():
            mask.save(Path(out) / f"{wrapping}.safetensors")


def one_step(model_dir: str, mask_path: str, out: str) -> None:
    """One static-mask step of each optimizer under each wrapping; rank 0 saves the whole weights."""
    from cpl_masks import distributed

    for wrapping in WRAPPINGS:
        for optimizer, lr in OPTIMIZERS.items():
            trainer = masked_trainer(model_dir, mask_path, optimizer, lr, wrapping)
            trainer.train_epoch(STEP, 1)
            weights = trainer.weights()  # gathered one tensor at a time under FSDP2
            if distributed.is_main():
                torch.save(weights, Path(out) / f"{wrapping}-{optimizer}.pt")


def masked_trainer(model_dir: str, mask_path: str, optimizer: str, lr: float, wrapping: str | None) -> Trainer:
    loaded = fresh(model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    method = StaticMask(MethodContext(scorer, [], Mask.load(mask_path)))
    config = TrainConfig(lr=lr, optimizer=optimizer, batch_size=len(STEP), show_progress=False, distributed=wrapping)
    return Trainer(loaded.model, scorer, method, config)


def half_mask(model) -> Mask:
    """About half of every tensor's entries collaborative, one tensor wholly frozen."""
    generator = torch.Generator().manual_seed(0)
    bits = {name: torch.rand(p.shape, generator=generator) < 0.5 for name, p in model.named_parameters()}
    bits["model.layers.0.self_attn.q_proj.weight"].fill_(False)
    return Mask.from_bool(bits, {"model": {"ref": "tiny", "fingerprint": model_fingerprint(model)}})


def test_ddp_and_fsdp2_masks_equal_the_single_process_mask(tiny_model_dir, tmp_path):
    spawn("profile_both", str(tiny_model_dir), str(tmp_path))
    loaded = fresh(tiny_model_dir)
    expected = profile(loaded, MASTERED, INJECT, batch_size=2, show_progress=False)
    scorer = make_scorer("letter", loaded.tokenizer)
    g_m = mean_gradients(loaded.model, scorer, MASTERED, batch_size=2)
    g_i = mean_gradients(loaded.model, scorer, INJECT, batch_size=2)
    for wrapping in WRAPPINGS:
        mask = Mask.load(tmp_path / f"{wrapping}.safetensors")
        assert mask.metadata["profile"]["processes"] == 2 and mask.metadata["profile"]["wrapping"] == wrapping
        assert mask.metadata["model"]["fingerprint"] == expected.metadata["model"]["fingerprint"]
        for name in expected.names:
            differ = mask.collaborative(name) != expected.collaborative(name)
            tiny_scores = (g_m[name] * g_i[name]).abs() < 1e-12
            assert not (differ & ~tiny_scores).any(), f"{wrapping}: {name} differs where |s| >= 1e-12"
            assert mask.metadata["tensors"][name]["touched"] == expected.metadata["tensors"][name]["touched"]


def test_masked_step_under_ddp_and_fsdp2_equals_the_single_process_step(tiny_model_dir, tmp_path):
    initial = {name: p.detach().clone() for name, p in fresh(tiny_model_dir).model.named_parameters()}
    mask = half_mask(fresh(tiny_model_dir).model)
    mask_path = mask.save(tmp_path / "mask.safetensors")
    spawn("one_step", str(tiny_model_dir), str(mask_path), str(tmp_path))
    for optimizer, lr in OPTIMIZERS.items():
        single = masked_trainer(str(tiny_model_dir), str(mask_path), optimizer, lr, None)
        single.train_epoch(STEP, 1)
        expected = single.weights()
        assert any(not torch.equal(expected[name], initial[name]) for name in expected)
        for wrapping in WRAPPINGS:
            weights = torch.load(tmp_path / f"{wrapping}-{optimizer}.pt", weights_only=True)
            for name, value in weights.items():
                where = f"{wrapping} {optimizer} {name}"
                torch.testing.assert_close(
                    value, expected[name], rtol=0, atol=TOLERANCE[optimizer], msg=lambda m, w=where: f"{w}: {m}"
                )
                frozen = ~mask.collaborative(name)
                assert torch.equal(value[frozen].view(torch.int32), initial[name][frozen].view(torch.int32)), name


def run_cli(*args: str, env: dict[str, str], timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def cli_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "CPL_MASKS_HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_torchrun_example_profiles_and_trains_with_rank_zero_writing(tiny_model_dir, tmp_path):
    result = run_cli(
        "bash", "examples/torchrun_train.sh", str(tiny_model_dir), str(tmp_path / "run"), env=cli_env(tmp_path)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("registered as") == 1  # one rank printed, saved and registered the mask
    run = json.loads((tmp_path / "run" / "cpl" / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "backend": "gloo", "wrapping": "ddp"}
    assert (tmp_path / "run" / "cpl" / "model" / "config.json").is_file()
    with sqlite3.connect(tmp_path / "home" / "registry.sqlite3") as db:
        assert db.execute("select count(*) from masks").fetchone()[0] == 1
        assert db.execute("select count(*) from runs").fetchone()[0] == 1  # rank 1 recorded nothing


FAILING = """
import importlib, sys, time
from cpl_masks import distributed
from cpl_masks.cli.app import app
from cpl_masks.errors import CplError

def broken(*args, **kwargs):
    if sys.argv[1] == "hang":
        time.sleep(300)
    raise CplError("injected failure")

if distributed.launch_env().rank == 1:
    importlib.import_module("cpl_masks.profile").mean_gradients = broken  # the package's `profile` is the function
app(sys.argv[2:])
"""


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_a_failing_rank_stops_every_rank_with_one_line(tiny_model_dir, tmp_path, failure):
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in INJECT])
    mastered = write_rows(tmp_path / "mastered.jsonl", [q.to_record() for q in MASTERED])
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    env = {**cli_env(tmp_path), "CPL_MASKS_DIST_TIMEOUT": "10", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    profile_args = ["profile", "--model", str(tiny_model_dir), "--mastered", str(mastered), "--inject", str(inject)]
    started = time.monotonic()
    result = run_cli(*command, str(script), failure, *profile_args, "--device", "cpu", env=env, timeout=90)
    assert result.returncode != 0 and time.monotonic() - started < 60
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: rank ")]
    assert {line[len("error: rank ") :][:3] for line in errors} == {"0/2", "1/2"}, output[-4000:]
    if failure == "raise":
        assert "error: rank 1/2: injected failure" in errors


def test_bfloat16_weights_train_as_float32_masters_and_save_back(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu", threads=1)
    initial = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    mask = half_mask(loaded.model)
    scorer = make_scorer("letter", loaded.tokenizer)
    config = TrainConfig(lr=1e-4, batch_size=len(STEP), show_progress=False)
    trainer = Trainer(loaded.model, scorer, StaticMask(MethodContext(scorer, [], mask)), config)
    trainer.train_epoch(STEP, 1)
    masters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert all(value.dtype == torch.float32 for value in masters.values())
    assert trainer.final_weights() is None
    for name, parameter in trainer.model.named_parameters():
        assert parameter.dtype == torch.bfloat16
        frozen = ~mask.collaborative(name)
        assert torch.equal(parameter.detach()[frozen].view(torch.int16), initial[name][frozen].view(torch.int16))
    below_resolution = sum(
        int(((masters[name] != initial[name].float()) & (masters[name].bfloat16() == initial[name])).sum())
        for name in masters
    )
    assert below_resolution > 0  # updates a bfloat16 weight would have rounded away, kept by the masters
