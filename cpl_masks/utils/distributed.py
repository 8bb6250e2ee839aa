"""Running under ``torchrun`` or ``accelerate launch``: ranks, collectives, and who writes files.

Both launchers start one process per device and describe the job in ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``). :func:`setup` joins that job's process group
(gloo on the CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``); without those variables every
function here is the single-process identity, so the rest of the code calls them unconditionally.

The rules the pipeline follows under N processes:

* questions are sharded, rank ``r`` taking questions ``r::N`` (:func:`shard`);
* gradient sums are all-reduced in float32 and divided by the global count, so a mean equals the
  single-process mean (:func:`all_reduce_sum`);
* per-question results are gathered back in the original order (:func:`gather_shards`);
* files and registry rows are written by rank 0 alone while the others wait
  (:meth:`Processes.on_main`, on the object :func:`setup` returns), and a failure there is raised
  on every rank;
* every collective times out (``CPL_MASKS_DIST_TIMEOUT`` seconds, default 600), and a rank that
  fails makes the others stop with a one-line error (:func:`reports_rank_errors`) rather than hang.

Wrapping a model for training (DDP, FSDP2) and moving tensors between whole and sharded live in
:mod:`cpl_masks.utils.sharding`.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from cpl_masks.errors import CplError

T = TypeVar("T")
# Modules with functions whose default argument is ``group=group.WORLD``: that default is evaluated at
# import. Imported after init_process_group (transformers imports torch.distributed.fsdp when it loads
# a model class), they keep the live world group past destroy_process_group (10 references), so it is
# torn down during interpreter shutdown, where gloo can abort the process ("terminate called without an
# active exception", SIGABRT: 3 of 6 launches of a 2-rank script that keeps one such reference, 0 of 6
# without it). Imported first, they hold None.
IMPORTS_CAPTURING_THE_WORLD_GROUP = ("torch.distributed.nn", "torch.distributed.optim", "torch.distributed.fsdp")
TIMEOUT_ENV = "CPL_MASKS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job the launcher started (rank 0 of 1 without a launcher)."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> Launch:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun and accelerate set them."""
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(key, str(default))
        try:
            values[key] = int(text)
        except ValueError:
            raise CplError(f"{key}={text!r}: not an integer (set by torchrun or accelerate launch)") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise CplError(f"RANK={launch.rank} WORLD_SIZE={launch.world_size}: rank must lie in [0, WORLD_SIZE)")
    return launch


def timeout_seconds() -> float:
    """How long any collective may wait for the other ranks (``CPL_MASKS_DIST_TIMEOUT``, default 600 s)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        raise CplError(f"{TIMEOUT_ENV}={text!r}: not a number of seconds") from None
    if not seconds > 0:
        raise CplError(f"{TIMEOUT_ENV}={text!r}: must be positive")
    return seconds


def setup(device: str = "auto") -> Processes:
    """Join the launcher's process group once (a no-op in a single process or when already joined);
    returns this rank's :class:`Processes`, which a recipe passes to whatever writes files.

    On CUDA the rank's device becomes ``cuda:LOCAL_RANK`` (so ``cuda`` and ``auto`` mean it) and the
    backend is nccl; on the CPU it is gloo. Every collective then times out after
    :func:`timeout_seconds`, and SIGTERM (what a launcher sends the survivors when a rank fails)
    becomes a one-line error instead of a silent kill.
    """
    launch = launch_env()
    if launch.world_size == 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return Processes.current()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise CplError(
            "DeepSpeed ZeRO is not supported (its flat partitions and own optimizer step cannot keep a per-entry "
            "mask); launch without the DeepSpeed config and use --distributed fsdp2 to shard"
        )
    from cpl_masks.models import resolve_device

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(launch.local_rank)
    for module in IMPORTS_CAPTURING_THE_WORLD_GROUP:
        importlib.import_module(module)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_seconds()))
    atexit.register(leave)
    _stop_on_sigterm()
    return Processes.current()


def exit_launched(status: object) -> None:
    """End a rank of a launched job with ``status`` (as ``SystemExit`` takes it), skipping the teardown.

    The exit handlers run first, while the interpreter is whole (:func:`leave` among them, so the
    group is left and its threads stopped); then the process ends without the interpreter's teardown
    and C++ static destructors, where gloo threads have aborted ranks whose work was done and written
    ("terminate called without an active exception", SIGABRT). In a single process it returns.
    """
    if launch_env().world_size == 1:
        return
    code = 0 if status is None else status if isinstance(status, int) else 1
    if not isinstance(status, (int, type(None))):
        print(status, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave() -> None:
    """Leave the process group while the interpreter is whole (registered at exit by :func:`setup`).

    Collecting garbage afterwards frees what still held the group in a reference cycle (a DDP wrapper),
    so no gloo thread outlives the interpreter's shutdown.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        gc.collect()


def _stop_on_sigterm() -> None:
    """Turn the launcher's SIGTERM into a :class:`CplError`, so the rank says why it stops."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def stop(_signum: int, _frame: Any) -> None:
        raise CplError("stopped by the launcher (SIGTERM): another rank failed or the job was cancelled")

    signal.signal(signal.SIGTERM, stop)


def active() -> bool:
    """True inside a process group of more than one rank."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files, registry rows and tables."""
    return rank() == 0


@dataclass(frozen=True)
class Processes:
    """The job's processes as this rank sees them, and the rank-0 rule: rank 0 alone writes files.

    :func:`setup` returns it once, at the entry of a recipe (a training run, a profile command), and
    the recipe passes it to each helper that writes a file, takes a lock or writes a registry row, as
    accelerate's ``Accelerator`` is passed around; so the rank-0 decisions stand where the recipe
    calls :meth:`on_main` and :meth:`main_first`, not in every helper. Outside a launched job it is
    rank 0 of 1, and both run the action as it is.
    """

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> Processes:
        """The processes as they stand now: the joined group's, else rank 0 of 1."""
        return cls(rank(), world_size())

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files, registry rows and tables."""
        return self.rank == 0

    def on_main(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0 alone; every rank returns its result (which must pickle).

        The others wait for it, so nothing reads a file before it is written. A failure on rank 0 is
        raised there as it is and on the others as a :class:`CplError` saying so, so every rank stops.
        """
        return self._main_outcome(action, share=True)

    def main_first(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0, then on the others; each rank returns its own result.

        For work that fills a cache the others then read (the GGUF conversion of a built-in model).
        """
        result = self._main_outcome(action, share=False)
        return result if self.is_main else action()

    def _main_outcome(self, action: Callable[[], T], *, share: bool) -> T:
        if self.world_size == 1:
            return action()
        result: Any = None
        error: BaseException | None = None
        sent: list[Any] = [None]
        if self.is_main:
            try:
                result = action()
                sent = [("ok", result if share else None)]
            except BaseException as caught:
                error = caught
                sent = [("error", _one_line(caught))]
        torch.distributed.broadcast_object_list(sent, src=0)
        if error is not None:
            raise error
        status, value = sent[0]
        if status == "error":
            raise CplError(f"rank 0 failed: {value}")
        return result if self.is_main else value


def describe() -> dict[str, Any]:
    """What ``run.json`` and a mask's ``profile`` section record about the processes."""
    if not active():
        return {"world_size": 1, "backend": None}
    return {"world_size": world_size(), "backend": torch.distributed.get_backend()}


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of ``items``: positions ``rank::world_size`` (all of them in one process)."""
    return items[rank() :: world_size()] if active() else items


def shard_size(count: int) -> int:
    """The largest share :func:`shard` gives any rank of ``count`` items."""
    return math.ceil(count / world_size())


def gather_shards(local: Sequence[T], total: int) -> list[T]:
    """Inverse of :func:`shard`: every rank's items back in their original order, on every rank."""
    if not active():
        return list(local)
    parts: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(parts, list(local))
    return [parts[index % len(parts)][index // len(parts)] for index in range(total)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (the identity in one process); returns it."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        torch.distributed.barrier()


def _one_line(error: BaseException) -> str:
    """The error's first line, without bracketed source locations such as ``[/.../pair.cc:553]``."""
    lines = re.sub(r"\[[^\]]*(/|\.cc:|\.cpp:)[^\]]*\]\s*", "", str(error)).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    return detail if isinstance(error, CplError) else f"{type(error).__name__}: {detail}"


def reports_rank_errors(command: Callable[..., T]) -> Callable[..., T]:
    """Prefix a CLI command's errors with the rank, and turn a broken collective into one line.

    When a rank fails, its process exits and the others' next collective breaks (gloo: the peer's
    connection closes; nccl: the launcher's SIGTERM or the timeout). They then raise a
    :class:`CplError` naming the cause, which the CLI prints as one line with exit status 2.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except CplError as error:
            if not _grouped():
                raise
            raise CplError(f"rank {_launch_rank()}: {error}") from error
        except (RuntimeError, TimeoutError) as error:
            if not _grouped() or not _is_collective_failure(error):
                raise
            cause = _one_line(error).split(". ")[0]  # gloo adds advice after its first sentence
            raise CplError(
                f"rank {_launch_rank()}: a collective with the other ranks failed ({cause}); "
                "another rank probably failed first, see its error"
            ) from error

    return wrapper


def _grouped() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _launch_rank() -> str:
    launch = launch_env()
    return f"{launch.rank}/{launch.world_size}"


def _is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, (getattr(torch.distributed, "DistError", TimeoutError), TimeoutError)):
        return True
    text = str(error).lower()
    return any(mark in text for mark in ("gloo", "nccl", "connection closed", "connection reset", "timed out"))
