"""Versions of the packages that shape results, stamped into every file the tool writes."""

from __future__ import annotations

import datetime
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("cpl-masks", "torch", "transformers", "safetensors", "huggingface-hub", "datasets")


def package_versions() -> dict[str, str]:
    """Installed version of each package that can change a result (``"missing"`` if absent)."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def stamp() -> dict[str, object]:
    """The ``versions`` and ``created`` (UTC, ISO 8601) entries every new mask's metadata carries.

    One helper, so masks made by profiling, algebra and controls record them identically.
    """
    return {
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
