"""Options shared by several commands, error reporting, and table output."""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table
from safetensors import SafetensorError

from cpl_masks.data.questions import DATA_FORMATS, FieldNames
from cpl_masks.errors import CplError
from cpl_masks.scoring.base import SCORINGS_HELP
from cpl_masks.scoring.completion import LOSS_ON_HELP
from cpl_masks.utils.files import describe_os_error

stdout = Console()
stderr = Console(stderr=True)
Command = TypeVar("Command", bound=Callable[..., Any])
# C0 and C1 control characters (ESC, CSI, BEL, newlines ...) and the bidirectional overrides that
# can make text read in another order than it is stored
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Hub id, local folder, .gguf file, or a built-in: smollm2-135m-instruct, gemma3-270m."
    ),
]
DtypeOption = Annotated[str, typer.Option(help="Weights dtype: float32 or bfloat16.")]
DeviceOption = Annotated[str, typer.Option(help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")]
ThreadsOption = Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")]
ScoringOption = Annotated[str, typer.Option(help=f"{SCORINGS_HELP}.")]
BatchSizeOption = Annotated[int, typer.Option(help="Questions per forward pass.")]
EvalBatchSizeOption = Annotated[
    int, typer.Option(help="Questions per forward pass when evaluating and computing reference gradients.")
]
EvalEveryOption = Annotated[int, typer.Option(help="Evaluate every K epochs (and always the last).")]
SplitOption = Annotated[str | None, typer.Option(help="Dataset split, for dataset folders and hub datasets.")]
QuestionFieldOption = Annotated[str, typer.Option(help="Field holding the question (or the full prompt).")]
ChoicesFieldOption = Annotated[str, typer.Option(help="Field holding the list of choices.")]
AnswerFieldOption = Annotated[str, typer.Option(help="Field holding the answer: a letter or a 0-based index.")]
TextFieldOption = Annotated[str, typer.Option(help="Free-form: field holding a text to learn whole.")]
MessagesFieldOption = Annotated[str, typer.Option(help="Free-form: field holding a conversation (role/content).")]
PromptFieldOption = Annotated[str, typer.Option(help="Free-form: field holding the prompt (text or messages).")]
CompletionFieldOption = Annotated[str, typer.Option(help="Free-form: field holding the completion to learn.")]
FormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        help=f"The data's format: {', '.join(DATA_FORMATS)}; default: what its columns say "
        "(question/choices/answer, or TRL's text, messages, prompt/completion).",
    ),
]
LossOnOption = Annotated[str, typer.Option(help=f"{LOSS_ON_HELP}.")]
OverwriteOption = Annotated[bool, typer.Option(help="Write into a non-empty output folder.")]
TrackTextOption = Annotated[
    str | None,
    typer.Option(help="A general text file whose loss is tracked per epoch as a measure of forgetting."),
]


def old_spelling(old: str, new: str, *short: str) -> Any:
    """A hidden option under a renamed option's old spelling, still accepted (see :func:`renamed`)."""
    return typer.Option(old, *short, hidden=True, help=f"Old spelling of {new}.")


def renamed(value: Any, old_value: Any, old: str, new: str) -> Any:
    """The value of a renamed option given under either spelling; the old one warns on stderr.

    Raises:
        CplError: both spellings were given.
    """
    if old_value is None:
        return value
    if value is not None:
        raise CplError(f"{old} is the old spelling of {new}; give one of them")
    stderr.print(f"warning: {old} is renamed {new}; the old spelling will go", highlight=False, soft_wrap=True)
    return old_value


def new_app(**settings: Any) -> typer.Typer:
    """A Typer app with the settings every command group shares.

    Help is click's plain layout (``rich_markup_mode=None``): it wraps each option's help in one
    column beside its name, readable at 80 columns, where rich's panels squeeze it into a sliver.
    A paragraph after a ``\\b`` line (the examples) keeps its line breaks.
    """
    return typer.Typer(
        rich_markup_mode=None,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
        **settings,
    )


def fields(**names: str) -> FieldNames:
    """Field-name options (``question=...``, ``prompt=...``) as the data module's :class:`FieldNames`."""
    return FieldNames(**names)


def reports_errors(command: Command) -> Command:
    """Print a :class:`CplError` (or an ``OSError``: a missing file, a full disk) as one line on stderr, exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CplError as error:
            fail(str(error))
        except OSError as error:  # a missing file, a full disk, a folder in the way: one line naming it
            fail(describe_os_error(error))
        except SafetensorError as error:  # e.g. weights written to a full disk
            fail(f"cannot read or write a safetensors file: {str(error).splitlines()[0][:200]}")
        except sqlite3.Error as error:  # the registry reports its own; this is the net under it
            fail(f"registry database: {error}")

    return wrapper  # type: ignore[return-value]


INTERRUPTED_EXIT = 130  # what a shell reports for a command stopped by Ctrl-C


@contextlib.contextmanager
def reports_interrupts(resume: str | Callable[[], str | None]) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM inside: one line, ``interrupted; nothing was lost, resume with: ...``.

    SIGTERM is turned into the same ``KeyboardInterrupt`` while inside (the previous handler comes
    back on exit), so a killed command unwinds through its ``finally`` blocks like Ctrl-C. Exits
    with status 130. ``resume`` is the command that continues the work or, asked only once the command
    was interrupted, a function that returns it when it can work and None when it cannot (the work had
    not started: nothing was kept, and the same command starts it again).
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        hint = resume() if callable(resume) else resume
        message = (
            f"interrupted; nothing was lost, resume with: {untrusted(hint)}"
            if hint is not None
            else "interrupted before the work started; nothing was kept, run the same command again"
        )
        stderr.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def untrusted(value: Any) -> str:
    """Text for rich from anything that came from a file, the Hub or the user: shown, never obeyed.

    Control characters become visible escapes (``\\x1b``), so no escape sequence reaches the
    terminal; rich markup is escaped, so ``[link=...]`` or ``[/]`` prints as it is written. Every
    string the commands print goes through here (tables, trees, messages, errors).
    """
    return escape(_CONTROL.sub(_visible, str(value)))


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def say(message: str) -> None:
    """Print a line on stdout that holds names, paths or metadata: through :func:`untrusted`, never cut."""
    stdout.print(untrusted(message), highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout; non-ASCII characters as ``\\u`` escapes, so no control character passes."""
    stdout.print_json(data=data, ensure_ascii=True)


def fail(message: str) -> None:
    """Stop the command with a one-line error (its text through :func:`untrusted`)."""
    stderr.print(f"[bold red]error:[/] {untrusted(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(CplError.exit_code)


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, whole: Collection[str] = ()
) -> None:
    """Print a small rich table on stdout.

    Cells of the ``whole`` columns (names, ids, paths a user copies) are never cut with "…": the
    table is printed as wide as they need, even wider than a narrow terminal. Printed to a file or a
    pipe (no terminal to fit), every table is printed whole, as wide as its widest row.
    """
    table = Table(title=untrusted(title), title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=index == 0 or column in whole)
    for row in rows:
        table.add_row(*(format_cell(cell) for cell in row))
    if not whole and stdout.is_terminal:
        stdout.print(table)
        return
    width = max(stdout.width, Measurement.get(stdout, stdout.options.update(max_width=10**6), table).maximum)
    stdout.print(Segments(stdout.render(table, stdout.options.update(width=width, max_width=width))), soft_wrap=True)


def format_cell(value: Any) -> str:
    """Numbers for humans (floats get 4 significant digits; percentages are the caller's job), text untrusted."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return untrusted(value)
