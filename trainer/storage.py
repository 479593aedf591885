"""Paths and URLs through fsspec, and atomic directory outputs.

Every output directory is written under a temporary sibling name and renamed
into place at the end, so a crashed run never leaves something that looks
complete.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator

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


@contextlib.contextmanager
def atomic_directory(url: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary URL to write a directory into; rename it to ``url`` on success.

    On an exception the temporary directory is removed and ``url`` is left as
    it was. An existing ``url`` is an error unless ``overwrite``.
    """
    fs, path = filesystem(url)
    path = path.rstrip("/")
    if fs.exists(path) and not overwrite:
        raise UserError(f"output already exists: {url} (remove it or pass --overwrite)")
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    tmp_path = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.makedirs(tmp_path, exist_ok=True)
    try:
        yield protocol + tmp_path
    except BaseException:
        fs.rm(tmp_path, recursive=True)
        raise
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.mv(tmp_path, path, recursive=True)


@contextlib.contextmanager
def atomic_files(urls: list[str], overwrite: bool) -> Iterator[list[str]]:
    """Temporary URLs for ``urls``, renamed into place (the first one last) on success, removed on failure."""
    fs, paths = zip(*(filesystem(u) for u in urls))
    existing = [u for u, f, p in zip(urls, fs, paths) if f.exists(p)]
    if existing and not overwrite:
        raise UserError(f"output already exists: {', '.join(existing)} (remove it or pass --overwrite)")
    suffix = f".tmp-{uuid.uuid4().hex[:8]}"
    tmp = [u + suffix for u in urls]
    try:
        yield tmp
    except BaseException:
        for f, p in zip(fs, paths):
            if f.exists(p + suffix):
                f.rm(p + suffix)
        raise
    for f, p in reversed(list(zip(fs, paths))):
        f.mv(p + suffix, p)
