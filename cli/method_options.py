"""Command-line options generated from the methods table, the way transformers' ``HfArgumentParser``
reads dataclass fields: each option of a method's options dataclass becomes ``--name`` with its
field's type, help text and default, so a method's options are written once, in its module.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from cpl_masks.methods import OptionField, option_fields


def with_method_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with one keyword option per method option of ``METHODS``, gathered into its
    ``method_options`` argument (a dict of the options given, by field name).

    Each option is None unless given, so the method's own default applies; its help says which
    methods take it and that default. Decorate when the app is built, so a method added to the
    table before then gets its options too.
    """
    fields = option_fields()
    signature = inspect.signature(command, eval_str=True)
    kept = [param for param in signature.parameters.values() if param.name != "method_options"]
    added = [
        inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[_optional(field.type), typer.Option(help=_help(field), show_default=False)],
        )
        for field in fields
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {field.name: kwargs.pop(field.name, None) for field in fields}
        return command(
            *args, method_options={key: value for key, value in given.items() if value is not None}, **kwargs
        )

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return wrapper


def _optional(kind: Any) -> Any:
    return kind if type(None) in getattr(kind, "__args__", ()) else kind | None


def _help(field: OptionField) -> str:
    """``lora: adapter rank r (default 8).``: the methods that take it, its help and its default."""
    text = f"{', '.join(field.methods)}: {field.help}"
    if field.default is not None:
        text += f" (default {field.default:g})" if isinstance(field.default, float) else f" (default {field.default})"
    return text + "."
