"""Paths and URLs through fsspec: one way to open, join and check any local path or URL.

Outputs that must survive a crash (written under a temporary name, then renamed) are
``trainer.atomic_output``'s.
"""

from __future__ import annotations

import fsspec
from fsspec.core import url_to_fs

from trainer.errors import UserError


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URL."""
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {url!r}: {e}") from None


def require_exists(url: str, what: str = "input") -> None:
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise UserError(f"{what} not found: {url}")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])
