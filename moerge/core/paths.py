"""Where moerge keeps what it can make again: converted models, downloaded library files, derived libraries."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """moerge's cache folder: ``$MOERGE_CACHE``, else ``~/.cache/moerge``."""
    return Path(os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge")
