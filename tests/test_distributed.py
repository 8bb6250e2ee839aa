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

from cpl_masks.masks.format import Mask
from cpl_masks.methods import MethodContext
from cpl_masks.methods.masking import StaticMask
from cpl_masks.models import load_model, model_fingerprint
from cpl_masks.profiling.freeze_mask import profile
from cpl_masks.profiling.gradients import mean_gradients
from cpl_masks.scoring.scorers import make_scorer
from cpl_masks.training.loop import TrainConfig, TrainingLoop
from tests.conftest import make_questions, write_rows

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

ROOT = Path(__file__).resolve().parents[1]
MASTERED = make_questions(9, seed=11, prefix="m")
INJECT = make_questions(7, seed=12, prefix="i")
STEP = make_questions(5, seed=13, prefix="s")  # one step of batch 5: rank 0 takes 3 questions, rank 1 takes 2
WRAPPINGS = ("ddp", "fsdp2")
OPTIMIZERS = {"sgd": 0.05, "adamw": 1e-3}  # learning rates
ADAM_EPS = 1e-8  # torch's AdamW default, which MaskedAdamW keeps
# A gradient summed per rank and then all-reduced rounds differently from one summed in one process:
# the two agree to float32 rounding of the gradient's scale, not bit for bit.
GRADIENT_ROUNDING = 1e-5  # relative to the tensor's largest |g|
# AdamW's first step moves an entry by lr·g/(|g|+ε), whose slope in g is lr·ε/(|g|+ε)². Where |g| is
# well above both ε and its own rounding error δ, two orders of summation give steps that differ by
# at most lr·ε·δ/|g|², far below this tolerance; elsewhere the step is decided by rounding.
WELL_CONDITIONED = 1e3  # |g| ≥ this × max(ε, δ)
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
    from cpl_masks.utils import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.setup("cpu")
    globals()[task](*args)
    distributed.exit_launched(0)


def profile_both(model_dir: str, out: str) -> None:
    """Profile a fresh model under each wrapping; rank 0 saves each mask (ranks must agree)."""
    from cpl_masks.utils import distributed

    for wrapping in WRAPPINGS:
        mask = profile(fresh(model_dir), MASTERED, INJECT, batch_size=2, show_progress=False, wrapping=wrapping)
        ids = [None, None]
        torch.distributed.all_gather_object(ids, mask.id)
        assert ids[0] == ids[1], f"{wrapping}: the ranks made different masks"
        if distributed.is_main():
            mask.save(Path(out) / f"{wrapping}.safetensors")


def one_step(model_dir: str, mask_path: str, out: str) -> None:
    """One static-mask step of each optimizer under each wrapping; rank 0 saves the whole weights
    and the gradients the optimizer stepped with."""
    from cpl_masks.utils import distributed

    for wrapping in WRAPPINGS:
        for optimizer, lr in OPTIMIZERS.items():
            trainer = masked_trainer(model_dir, mask_path, optimizer, lr, wrapping)
            captured = stepped_gradients(trainer)
            trainer.train_epoch(STEP, 1)
            weights = trainer.weights()  # gathered one tensor at a time under FSDP2
            gradients = whole(captured)
            if distributed.is_main():
                torch.save({"weights": weights, "gradients": gradients}, Path(out) / f"{wrapping}-{optimizer}.pt")


def stepped_gradients(trainer: TrainingLoop) -> dict[str, torch.Tensor]:
    """Fills, at the optimizer's step, with every parameter's (reduced, masked) gradient: under FSDP2
    this rank's shard, gathered whole by :func:`whole` outside the hook, so no collective runs in it."""
    gradients: dict[str, torch.Tensor] = {}

    def capture(*_: object) -> None:
        named = ((name, p.grad) for name, p in trainer.model.named_parameters() if p.grad is not None)
        gradients.update((name, grad.detach().clone()) for name, grad in named)

    trainer.optimizer.register_step_pre_hook(capture)
    return gradients


def whole(gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each captured gradient whole, on the CPU (a collective under FSDP2: every rank calls it)."""
    from cpl_masks.utils import sharding

    return {name: full.cpu() for name, full in sharding.full_tensors(gradients.items())}


def masked_trainer(model_dir: str, mask_path: str, optimizer: str, lr: float, wrapping: str | None) -> TrainingLoop:
    loaded = fresh(model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    method = StaticMask(MethodContext(scorer, [], Mask.load(mask_path)))
    config = TrainConfig(lr=lr, optimizer=optimizer, batch_size=len(STEP), show_progress=False, distributed=wrapping)
    return TrainingLoop(loaded.model, scorer, method, config)


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
        captured = stepped_gradients(single)
        single.train_epoch(STEP, 1)
        single_gradients = whole(captured)
        expected = single.weights()
        assert any(not torch.equal(expected[name], initial[name]) for name in expected)
        for wrapping in WRAPPINGS:
            saved = torch.load(tmp_path / f"{wrapping}-{optimizer}.pt", weights_only=True)
            for name, value in saved["weights"].items():
                where = f"{wrapping} {optimizer} {name}"
                frozen = ~mask.collaborative(name)
                assert torch.equal(value[frozen].view(torch.int32), initial[name][frozen].view(torch.int32)), where
                assert (name in saved["gradients"]) == (name in single_gradients), where
                if name not in single_gradients:  # wholly frozen: nothing to step
                    continue
                gradient, reference = saved["gradients"][name], single_gradients[name]
                assert_same_up_to_rounding(gradient, reference, where)
                step, expected_step = value - initial[name], expected[name] - initial[name]
                if optimizer == "sgd":  # the step is -lr·g: as exact as the gradient
                    allowed = lr * GRADIENT_ROUNDING * float(reference.abs().max())
                    assert_steps_agree(step, expected_step, initial[name], allowed, where)
                else:
                    assert_same_adamw_step(step, expected_step, initial[name], gradient, reference, lr, where)


def assert_same_up_to_rounding(gradient: torch.Tensor, reference: torch.Tensor, where: str) -> None:
    """The reduced gradient equals the one-process gradient to float32 rounding of its scale."""
    tolerance = GRADIENT_ROUNDING * float(reference.abs().max())
    difference = float((gradient - reference).abs().max())
    assert difference <= tolerance, f"{where}: gradients differ by {difference:.3g} (rounding allows {tolerance:.3g})"


def assert_steps_agree(
    step: torch.Tensor, expected: torch.Tensor, initial: torch.Tensor, allowed: float, where: str
) -> None:
    """Steps differ by at most ``allowed`` plus the rounding of adding each step to its weight (an ulp each)."""
    bound = allowed + 2.0**-22 * initial.abs()
    excess = (step - expected).abs() - bound
    assert float(excess.max()) <= 0, f"{where}: {int((excess > 0).sum())} steps differ beyond rounding"


def assert_same_adamw_step(
    step: torch.Tensor,
    expected: torch.Tensor,
    initial: torch.Tensor,
    gradient: torch.Tensor,
    reference: torch.Tensor,
    lr: float,
    where: str,
) -> None:
    """The same AdamW step wherever the gradient is well above ε and its rounding error.

    Elsewhere the step is decided by rounding and only its size is checked: AdamW never moves an
    entry by more than lr on its first step.
    """
    rounding = (gradient - reference).abs()
    conditioned = reference.abs() >= WELL_CONDITIONED * rounding.clamp(min=ADAM_EPS)
    moved = reference != 0  # the mask zeroes frozen entries' gradients
    assert int((conditioned & moved).sum()) >= 0.9 * int(moved.sum()), f"{where}: too few entries to compare"
    assert_steps_agree(step[conditioned], expected[conditioned], initial[conditioned], 1e-5 * lr, where)
    assert float(step.abs().max()) <= lr * (1 + 1e-4), f"{where}: an AdamW step larger than lr"


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
import sys, time
from cpl_masks.profiling import freeze_mask
from cpl_masks.utils import distributed
from cpl_masks.cli.app import app
from cpl_masks.errors import CplError

def broken(*args, **kwargs):
    if sys.argv[1] == "hang":
        time.sleep(300)
    raise CplError("injected failure")

if distributed.launch_env().rank == 1:
    freeze_mask.mean_gradients = broken
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
    trainer = TrainingLoop(loaded.model, scorer, StaticMask(MethodContext(scorer, [], mask)), config)
    trainer.train_epoch(STEP, 1)
    masters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    wholly_frozen = "model.layers.0.self_attn.q_proj.weight"  # no step moves it: no master copy
    assert masters.pop(wholly_frozen).dtype == torch.bfloat16
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


LEAVING_RANK = """
import atexit, sys
from pathlib import Path
import torch
from cpl_masks.utils import distributed

late = ("torch.distributed.nn", "torch.distributed.fsdp")
assert not any(name in sys.modules for name in late), "the premise: nothing imported these yet"
distributed.setup("cpu")
world = torch.distributed.group.WORLD
import torch.distributed.fsdp  # as transformers does when it loads a model class, after the group exists
rank = distributed.rank()
atexit.register(lambda: Path(sys.argv[1], f"exit-handlers-ran-{rank}").touch())
distributed.leave()
Path(sys.argv[1], f"held-{rank}").write_text(str(sys.getrefcount(world) - 2))
import time  # a barrier without the group: the launcher stops every rank once one exits with 3
deadline = time.monotonic() + 120
while not Path(sys.argv[1], f"held-{1 - rank}").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
distributed.exit_launched(3)
raise AssertionError("exit_launched returned in a launched rank")
"""


def test_a_rank_leaves_its_group_whole_and_exits_with_its_status_after_the_exit_handlers(tmp_path):
    """Nothing keeps the world group past leave (a late import of torch.distributed.fsdp used to keep
    it in default arguments, to be torn down with the interpreter, where gloo aborted the rank), and a
    launched rank ends with the status it was given, its exit handlers having run."""
    script = tmp_path / "rank.py"
    script.write_text(LEAVING_RANK)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_cli(*launcher, str(script), str(tmp_path), env=cli_env(tmp_path))
    assert result.returncode != 0 and "exitcode  : 3" in result.stderr, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    for rank in (0, 1):
        assert (tmp_path / f"exit-handlers-ran-{rank}").exists()
        assert (tmp_path / f"held-{rank}").is_file(), f"rank {rank} failed before leaving: {result.stderr[-3000:]}"
        assert (tmp_path / f"held-{rank}").read_text() == "0", "something still holds the world group"
