"""Outputs that survive a crash: written under a temporary name, then renamed into place.

Every output directory is written under a temporary sibling name and renamed
into place at the end, so a crashed run never leaves something that looks
complete. Beside the temporary ``OUT.tmp-XXXXXXXX`` lies ``OUT.tmp-XXXXXXXX.owner``
(host, pid) while its run lives; ``--overwrite`` swaps the old output out
(``OUT.old-XXXXXXXX``) before renaming the new one in, and deletes it last, so
that a complete output exists at every instant. The next run on the same output
removes what a dead run of this host left (restoring the old output if it died
mid-swap) and reports, with size and how to remove it, what it cannot vouch for.
An output that cannot be written (below a file, on a read-only mount, without
permission) is a ``UserError`` before anything is written, and ``--overwrite`` replaces a
directory only when its marker file is what the tool writes. ``check_output`` runs these
checks on their own, for a tool that reads for minutes before it writes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shlex
import socket
import sys
import tempfile
import uuid
from typing import Any, Callable, Iterator, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

from trainer.errors import UserError
from trainer.storage import filesystem, join

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(
    url: str,
    overwrite: bool = False,
    *,
    marker: str | None = None,
    what: str = "output of this tool",
    inputs: Sequence[str] = (),
) -> Iterator[str]:
    """Yield a temporary URL to write a directory into; rename it to ``url`` on success.

    On an exception the temporary directory is removed and ``url`` is left as
    it was. An existing ``url`` is an error unless ``overwrite``; with
    ``marker`` (the file that marks the caller's own output, e.g.
    ``schema.json``) only an empty directory or one holding ``marker`` (a
    ``what``) is replaced. ``url`` may not be, hold or lie inside any of
    ``inputs``. What dead runs left beside ``url`` is cleaned up or reported first.
    """
    check_output(url, overwrite, marker=marker, what=what, inputs=inputs)
    fs, path = filesystem(url)
    path = path.rstrip("/")
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    token = uuid.uuid4().hex[:8]
    tmp_path, old_path = f"{path}.tmp-{token}", f"{path}.old-{token}"
    owner_path = tmp_path + _OWNER
    try:
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe(owner_path, json.dumps(owner_record()).encode())  # before the temporary: it never lacks one
    except OSError as e:
        _remove(fs, owner_path)
        raise _unwritable(url, e) from None
    try:
        try:
            fs.makedirs(tmp_path, exist_ok=True)
        except OSError as e:
            raise _unwritable(url, e) from None
        try:
            yield protocol + tmp_path
            _commit(fs, path, url, tmp_path, old_path, overwrite, marker, what)
        except BaseException:
            _remove(fs, tmp_path)
            raise
    finally:
        _remove(fs, owner_path)


def check_output(
    url: str, overwrite: bool = False, *, marker: str | None = None, what: str = "output of this tool", inputs: Sequence[str] = ()
) -> None:
    """What ``atomic_directory`` checks before it writes (a tool that reads for minutes calls it up
    front too): ``url`` is writable, does not overlap ``inputs``, and does not exist, or may be
    replaced (``overwrite``, ``marker``); what dead runs left beside it is cleaned up or reported."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    for source in inputs:
        refuse_overlap(url, source)
    check_writable(url)
    _recover(fs, path, url)
    if fs.exists(path):
        if not overwrite:
            raise UserError(f"output already exists: {url} (remove it or pass --overwrite)")
        _check_replaceable(fs, path, url, marker, what)


def _commit(
    fs: fsspec.AbstractFileSystem,
    path: str,
    url: str,
    tmp_path: str,
    old_path: str,
    overwrite: bool,
    marker: str | None,
    what: str,
) -> None:
    """Rename the finished temporary to ``path``; an existing output is swapped out first and deleted last."""
    if not fs.exists(path):
        _rename(fs, tmp_path, path)
        return
    if not overwrite:  # it appeared while this run was writing
        raise UserError(f"output already exists: {url} (written by another run meanwhile?); this run wrote nothing")
    _check_replaceable(fs, path, url, marker, what)
    _rename(fs, path, old_path)
    try:
        _rename(fs, tmp_path, path)
    except BaseException:
        if not fs.exists(path):
            _rename(fs, old_path, path)
        raise
    try:
        fs.rm(old_path, recursive=True)
    except OSError as e:
        log.warning("replaced %s, but could not remove its previous version %s (%s); remove it", url, old_path, e)


def _check_replaceable(fs: fsspec.AbstractFileSystem, path: str, url: str, marker: str | None, what: str) -> None:
    """Refuse to overwrite what is not the caller's own output nor an empty directory: its
    ``marker`` must be there, and (for the markers of ``_OWN_MARKERS``) be what that tool writes."""
    if marker is None:
        return
    if not fs.isdir(path):
        raise UserError(
            f"refusing to overwrite {url}: it is a file, not a {what}; remove it yourself or choose another output"
        )
    if not fs.ls(path, detail=False):
        return
    marker_path = join(path, marker)
    if fs.isfile(marker_path):
        why = _not_own_marker(fs, marker_path, marker)
        if why is None:
            return
        reason = f"its {marker} is not one this tool writes ({why})"
    else:
        reason = f"no {marker} in it"
    raise UserError(
        f"refusing to overwrite {url}: it is not a {what} ({reason}), and --overwrite would delete "
        "everything in it; remove it yourself or choose another output"
    )


def _dataset_schema(record: dict[str, Any]) -> None:
    from trainer.data.schema import DatasetSchema

    DatasetSchema.from_dict(record)


def _keys(*names: str) -> Callable[[dict[str, Any]], None]:
    def check(record: dict[str, Any]) -> None:
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")

    return check


# The marker files of this project's outputs, and what each must hold to mark one: a JSON
# object its writer wrote (a marker not listed here only has to exist).
_OWN_MARKERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "schema.json": _dataset_schema,  # a prepared dataset (trainer.data.schema)
    "MANIFEST.json": _keys("format", "files"),  # an exported model (trainer.export.runtime)
    "collapse.json": _keys("format", "reports"),  # a collapse report (trainer.collapse.report)
    "report.json": _keys("generator", "config", "days"),  # a synthetic ads log (trainer.data.synthetic_ads_log)
}


def _not_own_marker(fs: fsspec.AbstractFileSystem, marker_path: str, marker: str) -> str | None:
    """Why the file ``marker_path`` is not a ``marker`` this project writes; None when it is."""
    check = _OWN_MARKERS.get(marker)
    if check is None:
        return None
    try:
        record = json.loads(fs.cat_file(marker_path))
        if not isinstance(record, dict):
            return f"a JSON {type(record).__name__}, not an object"
        check(record)
    except (OSError, ValueError, UserError) as e:
        return str(e)[:200] or type(e).__name__
    return None


def check_writable(url: str) -> None:
    """UserError ``cannot write URL: reason`` when the output ``url`` cannot be created: a
    file where a directory above it should be, a read-only file system, no permission
    (local paths: a probe file in the nearest existing directory; an object store's refusal
    shows when the output is written)."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        return
    parent = os.path.dirname(os.path.abspath(path.rstrip("/") or "/"))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {url}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise _unwritable(url, e, parent) from None


def _unwritable(url: str, e: OSError, where: str | None = None) -> UserError:
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"cannot write {url}: {reason}" + (f" (in {where})" if where else ""))


def refuse_overlap(output_url: str, input_url: str) -> None:
    """A clear error when the output directory ``output_url`` is, holds or lies inside ``input_url``."""
    out_fs, out_path = filesystem(output_url)
    in_fs, in_path = filesystem(input_url)
    if type(out_fs) is not type(in_fs) or out_fs.protocol != in_fs.protocol:
        return
    if isinstance(out_fs, LocalFileSystem):  # through symbolic links
        out_path, in_path = os.path.realpath(out_path), os.path.realpath(in_path)
    out_path, in_path = out_path.rstrip("/") or "/", in_path.rstrip("/") or "/"
    if out_path == in_path:
        raise UserError(f"output {output_url} is the input {input_url}; choose another output")
    if in_path.startswith(out_path.rstrip("/") + "/"):
        raise UserError(
            f"output {output_url} contains the input {input_url} (writing there could delete it); choose another output"
        )
    if out_path.startswith(in_path.rstrip("/") + "/"):
        raise UserError(f"output {output_url} lies inside the input {input_url}; choose another output")


# --- temporaries of dead runs -----------------------------------------------------------------

_OWNER = ".owner"


def owner_record() -> dict[str, Any]:
    """Who this process is (host, pid, pid namespace, start time): what tells later runs whether it still runs."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_namespace": _pid_namespace(),
        "started": stat[1] if stat else None,  # clock ticks after boot: tells a reused pid apart
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of process ``pid`` from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_alive(record: Any) -> bool | None:
    """Whether the run of an owner record still runs: None when this machine cannot tell."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    namespace = record.get("pid_namespace")
    if namespace is not None and namespace != _pid_namespace():
        return None  # another container on this host: its pids are not ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        if state == "Z" or (record.get("started") is not None and started != record["started"]):
            return False  # a zombie, or the pid now belongs to another process
    return True


def _describe(record: Any) -> str:
    if record is None:
        return "no owner file: an older version's run, or one still running"
    if not isinstance(record, dict):
        return "unreadable owner file"
    since = f", since {record['since']}" if record.get("since") else ""
    return f"pid {record.get('pid')} on host {record.get('host')}{since}"


def _size(fs: fsspec.AbstractFileSystem, path: str) -> str:
    try:
        n = fs.du(path, total=True) if fs.isdir(path) else fs.size(path)
    except (OSError, ValueError):
        return "size unknown"
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _leftovers(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict[str, str]]:
    """token -> {"tmp" | "old" | "owner": path} of what runs on the output ``path`` left beside it."""
    parent, name = fs._parent(path), path.rsplit("/", 1)[-1]
    try:
        entries = fs.ls(parent, detail=False) if fs.isdir(parent) else []
    except (FileNotFoundError, NotADirectoryError):
        return {}
    pattern = re.compile(re.escape(name) + r"\.(tmp|old)-([0-9a-f]{8})(\.owner)?")
    found: dict[str, dict[str, str]] = {}
    for entry in entries:
        m = pattern.fullmatch(entry.rstrip("/").rsplit("/", 1)[-1])
        if m and not (m[1] == "old" and m[3]):
            found.setdefault(m[2], {})["owner" if m[3] else m[1]] = join(parent, m[0])
    return found


def _read_owner(fs: fsspec.AbstractFileSystem, owner_path: str | None) -> Any:
    if owner_path is None:
        return None
    try:
        return json.loads(fs.cat_file(owner_path))
    except (OSError, ValueError):
        return "unreadable"


def _removal_hint(fs: fsspec.AbstractFileSystem, paths: list[str], protocol: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return "rm -r " + " ".join(shlex.quote(p) for p in paths)
    return "delete " + " and ".join(protocol + p for p in paths) + " (with everything under them)"


def _recover(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Clean up after dead runs on ``url``: restore an output swapped out mid-overwrite, remove temporaries.

    Only what a run of this host (and pid namespace) left, once that run is
    gone; anything else is reported with its size and how to remove it.
    """
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    for token, found in sorted(_leftovers(fs, path).items()):
        record = _read_owner(fs, found.get("owner"))
        alive = _owner_alive(record)
        who = _describe(record)
        tmp, old = found.get("tmp"), found.get("old")
        if alive:
            log.info("%s is being written by another run (%s); leaving it alone", protocol + (tmp or path), who)
            continue
        if alive is None:
            if old and not fs.exists(path):
                log.warning(
                    "%s is missing, but %s (%s) holds its previous version, left by a run that was replacing it "
                    "(%s); if no run is writing %s, restore it: mv %s %s",
                    url, protocol + old, _size(fs, old), who, url, shlex.quote(old), shlex.quote(path),
                )
            for leftover in (p for p in (tmp, old if fs.exists(path) else None) if p):
                remove = [leftover] + ([found["owner"]] if leftover == tmp and "owner" in found else [])
                log.warning(
                    "%s (%s) was left by a run that crashed or is still running (%s); if no run is writing %s, "
                    "remove it: %s",
                    protocol + leftover, _size(fs, leftover), who, url, _removal_hint(fs, remove, protocol),
                )
            continue
        if old and not fs.exists(path):
            _rename(fs, old, path)
            log.warning("restored %s from %s: the run replacing it (%s) died mid-swap", url, protocol + old, who)
        for leftover in (p for p in (tmp, old) if p and fs.exists(p)):
            size = _size(fs, leftover)
            fs.rm(leftover, recursive=True)
            log.warning("removed %s (%s), left by a run that is no longer running (%s)", protocol + leftover, size, who)
        _remove(fs, found.get("owner"))


def clean_or_report(url: str, records: list[Any], what: str) -> None:
    """Remove the directory ``url`` that a run left (``what`` it is), once every one of its
    processes (``records``: ``owner_record``s) is known to be gone; leave it to a live one;
    otherwise report it with its size and how to remove it."""
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    alive = [_owner_alive(r) for r in records]
    who = "; ".join(_describe(r) for r in records) if records else _describe(None)
    size = _size(fs, path)
    if any(alive):
        log.info("%s (%s) belongs to a run still running (%s); leaving it alone", url, what, who)
    elif records and all(a is False for a in alive):
        fs.rm(path, recursive=True)
        log.warning("removed %s (%s, %s), left by a run that is no longer running (%s)", url, what, size, who)
    else:
        log.warning(
            "%s (%s, %s) was left by a run that crashed or is still running (%s); if no run uses it, remove it: %s",
            url, what, size, who, _removal_hint(fs, [path], protocol),
        )  # fmt: skip


def _rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, which must not exist (a local rename never moves ``src`` into a directory ``dst``)."""
    if isinstance(fs, LocalFileSystem):
        os.rename(src, dst)
    else:
        fs.mv(src, dst, recursive=True)


def _remove(fs: fsspec.AbstractFileSystem, path: str | None) -> None:
    """Remove ``path`` (a file or directory) if it exists; a failure is logged, not raised."""
    if path is None:
        return
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


@contextlib.contextmanager
def atomic_files(urls: list[str], overwrite: bool) -> Iterator[list[str]]:
    """Temporary URLs for ``urls``, renamed into place (the first one last) on success, removed on failure."""
    for url in urls:
        check_writable(url)
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
