"""The mask registry: where every mask came from and every task it was reused on.

An SQLite database and a content-addressed file store in one folder (``$CPL_MASKS_HOME`` unless a
:class:`Registry` is given another). Masks get names ``<model-slug>/<task>@vN``; anywhere a mask is
taken it can be named by a file path, an id or a unique id prefix, ``name@vN`` or ``name`` (its
latest version). Build one :class:`Registry` and pass it to what needs it.
"""

from __future__ import annotations

from cpl_masks.registry.catalog import Registry, Transfer, source_of
from cpl_masks.registry.maintenance import Health, Removal, StrayFile

__all__ = ["Health", "Registry", "Removal", "StrayFile", "Transfer", "source_of"]
