"""Print one table of an experiment's settings file (``experiments/configs/NAME.toml``) as command-line
arguments, one a line, for a queue to read into a bash array (``settings`` in ``settings.sh``).

    python experiments/queues/settings.py NAME|FILE.toml TABLE [VAR=VALUE ...] [--OPTION=VALUE ...]

``TABLE`` is a key of the file, dotted for a nested one (``runs.b-full``). A table prints its keys as
``--key value`` in the file's order: ``true`` as the bare flag, ``false`` not at all, the key ``args``
(a list) as positional arguments at its place. A table of tables (a queue's runs) prints its keys, the
names of its runs. A list prints one item a line, a number or a string itself. ``{var}`` in a string or
a key is filled from ``VAR=VALUE`` (a ``{var}`` left unfilled is an error), so ``runs.mask-s1`` finds the
table ``[runs."mask-s{seed}"]`` given ``seed=1``; ``--OPTION=VALUE`` replaces the value of an option
the table already has. Write learning rates as
strings (``"3e-5"``): TOML's floats would print as Python writes them (``3e-05``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli package reads the same files
    import tomli as tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")


def fill(value: object, variables: dict[str, str], strict: bool = True) -> str:
    """One value as an argument, its ``{var}`` placeholders filled (an unknown one an error, if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SystemExit(f"settings: {value!r} is not a string or a number")

    def lookup(match: re.Match[str]) -> str:
        if match[1] not in variables:
            if not strict:
                return match[0]
            raise SystemExit(f"settings: {{{match[1]}}} needs {match[1]}=VALUE")
        return variables[match[1]]

    return PLACEHOLDER.sub(lookup, value) if isinstance(value, str) else str(value)


def arguments(entry: object, variables: dict[str, str], overrides: dict[str, str]) -> list[str]:
    """A table as ``--key value`` (and its ``args`` in place), a list item by item, a scalar itself."""
    if isinstance(entry, list):
        return [fill(item, variables) for item in entry]
    if not isinstance(entry, dict):
        return [fill(entry, variables)]
    if entry and all(isinstance(value, dict) for value in entry.values()):
        return [fill(key, variables) for key in entry]
    unknown = set(overrides) - set(entry)
    if unknown:
        raise SystemExit(f"settings: no option {', '.join(sorted(unknown))} to replace")
    found = []
    for key, value in entry.items():
        if key == "args":
            found += [fill(item, variables) for item in value]
        elif key in overrides:
            found += [f"--{key}", overrides[key]]
        elif value is True:
            found.append(f"--{key}")
        elif value is not False:
            found += [f"--{key}", fill(value, variables)]
    return found


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    name, table, rest = argv[0], argv[1], argv[2:]
    path = Path(name) if name.endswith(".toml") else CONFIGS / f"{name}.toml"
    variables, overrides = {}, {}
    for item in rest:
        key, equals, value = item.partition("=")
        if not equals:
            raise SystemExit(f"settings: {item}: give VAR=VALUE or --OPTION=VALUE")
        (overrides if key.startswith("--") else variables)[key.removeprefix("--")] = value
    entry: object = tomllib.loads(path.read_text(encoding="utf-8"))
    for wanted in table.split("."):
        found = (
            [key for key in entry if fill(key, variables, strict=False) == wanted] if isinstance(entry, dict) else []
        )
        if not found:
            raise SystemExit(f"settings: {path} has no {table}")
        entry = entry[found[0]]
    print("\n".join(arguments(entry, variables, overrides)))


if __name__ == "__main__":
    main(sys.argv[1:])
