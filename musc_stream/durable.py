"""fsync of a file or a directory: what makes write-to-temp-then-rename survive a power loss.

One helper for every writer that promises durability (the audit log, the spool, line state, the
patch memory): a rename is only on disk once its directory is flushed too.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
