"""Where fetched and converted artifacts live: $MPLUS_CACHE, else .cache/mplus in the current directory.

One rule for `mplus fetch` (which writes there), the Makefile (which sets MPLUS_CACHE to the clone's
.cache/mplus), the tests, the benchmarks and checkpoints that name their base (memory/base_ref.py), which read
there. Set MPLUS_CACHE to use the artifacts from another directory."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_RULE = "$MPLUS_CACHE, else .cache/mplus in the current directory"


def cache_dir() -> Path:
    """The cache root (CACHE_RULE), absolute."""
    return Path(os.environ.get("MPLUS_CACHE") or Path.cwd() / ".cache" / "mplus").absolute()
