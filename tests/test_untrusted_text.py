"""Text from mask metadata, the Hub or the command line is shown as written, never obeyed by the terminal."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.cli.common import untrusted
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.registry.names import check_task, mask_name, slug

HOSTILE = "\x1b[2J\x1b]8;;https://evil.example\x07[link=https://evil.example]click[/link] [/] [bold]\x9b31m\u202eevil"


def cli(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def hostile_mask(path):
    bits = {"model.layers.0.mlp.up_proj.weight": torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.5}
    metadata = {
        "model": {"ref": f"org/{HOSTILE}", "fingerprint": HOSTILE},
        "data": {"inject": {"rows": 3, "sha256": HOSTILE, "path": HOSTILE}},
        "scoring": HOSTILE,
        "created": HOSTILE,
        "task": "arc",
        "parents": [],
        "notes": {HOSTILE: HOSTILE},
    }
    return Mask.from_bool(bits, metadata).save(path)


def assert_inert(output: str) -> None:
    """No control character reached the output; markup was printed, not interpreted."""
    assert not any(char in output for char in "\x1b\x07\x9b\u202e"), repr(output)
    assert "Traceback" not in output


def test_untrusted_escapes_markup_and_shows_control_characters():
    assert untrusted("[red]x[/]\x1b[2J") == "\\[red]x\\[/]\\x1b[2J"
    assert untrusted("a\u202eb\nc") == "a\\u202eb\\x0ac"


def test_inspect_and_registry_show_print_hostile_metadata_inertly(tmp_path):
    path = hostile_mask(tmp_path / "m.safetensors")
    for args in (("inspect", path), ("inspect", path, "--json"), ("registry", "add", path)):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert_inert(result.output)
    shown = cli("inspect", path)
    assert "[link=https://evil.example]click[/link]" in shown.output and "\\x1b[2J" in shown.output
    for args in (("registry", "show", path), ("registry", "show", path, "--json"), ("registry", "list")):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert_inert(result.output)
    assert "[link=https://evil.example]" in cli("registry", "show", path).output
    assert json.loads(cli("registry", "show", path, "--json").output)["provenance"]["scoring"] == HOSTILE


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (("inspect", "no[/]such.safetensors"), "no[/]such.safetensors"),
        (("inspect", "q[red].safetensors"), "q[red].safetensors"),
        (("inspect", "\x1b[2Jx.safetensors"), "\\x1b[2Jx.safetensors"),
        (("registry", "show", "[bold]name@v1"), "[bold]name@v1"),
    ],
)
def test_error_messages_show_file_names_as_written(args, shown):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert shown in " ".join(result.output.split())
    assert_inert(result.output)


def test_split_names_a_missing_question_file_with_brackets(tmp_path):
    result = cli("split", "--data", tmp_path / "q[red].jsonl", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'q[red].jsonl'}: no such file" in "".join(result.output.split("\n"))


def test_names_and_tasks_have_a_length_limit(tmp_path):
    with pytest.raises(CplError, match="10,000 characters; a task name has at most 64"):
        check_task("a" * 10_000)
    path = hostile_mask(tmp_path / "m.safetensors")
    result = cli("registry", "add", path, "--name", "a" * 10_000)
    assert result.exit_code == 2 and "at most 64" in result.output
    assert len(slug("org/" + "x" * 10_000)) <= 96
    long = {"model": {"ref": "org/" + "m" * 10_000}, "task": "t" * 10_000}
    assert len(mask_name(long, None)) <= 96 + 1 + 64


def test_tables_printed_to_a_pipe_are_whole(capsys):
    from cpl_masks.cli.common import print_table

    print_table("learned and forgotten by method", ["method", "learned"], [("x" * 100, "y" * 90)])
    output = capsys.readouterr().out
    assert "x" * 100 in output and "y" * 90 in output and "…" not in output
    assert "learned and forgotten by method" in output


def test_sigterm_and_ctrl_c_say_how_to_resume(capsys):
    import os
    import signal

    import typer

    from cpl_masks.cli.common import reports_interrupts

    for stop in (lambda: os.kill(os.getpid(), signal.SIGTERM), lambda: (_ for _ in ()).throw(KeyboardInterrupt)):
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(typer.Exit) as stopped, reports_interrupts("cpl-masks train --resume runs/[a]"):
            stop()
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert stopped.value.exit_code == 130 and signal.getsignal(signal.SIGTERM) is before
        assert (
            "interrupted; nothing was lost, resume with: cpl-masks train --resume runs/[a]" in capsys.readouterr().err
        )
