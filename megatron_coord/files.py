"""Files that other processes wait on (address files, ready files): written whole or not at all."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader polling
    for the file never sees it half written."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
