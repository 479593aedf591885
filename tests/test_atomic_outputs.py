"""``trainer.atomic_output.atomic_directory`` on its own (local paths and ``memory://``): the swap of
``--overwrite``, what it refuses to replace, and what it does with what dead runs left beside the
output. The preprocess CLI's end-to-end checks are in ``tests/test_preprocess_faults.py``."""

from __future__ import annotations

import json
import logging
import socket
import uuid

import pytest

from tests.helpers import dead_pid
from trainer.atomic_output import atomic_directory, refuse_overlap
from trainer.errors import UserError
from trainer.storage import filesystem


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    """A parent directory URL (local or memory://) holding nothing yet; yields (fs, parent path, parent URL)."""
    if request.param == "local":
        fs, path = filesystem(str(tmp_path))
        yield fs, path, str(tmp_path)
    else:
        name = f"atomic-{uuid.uuid4().hex[:8]}"
        fs, path = filesystem(f"memory://{name}")
        fs.makedirs(path, exist_ok=True)
        try:
            yield fs, path, f"memory://{name}"
        finally:
            fs.rm(path, recursive=True)


def _names(fs, path: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _write(url: str, files: dict[str, bytes], **kw) -> None:
    with atomic_directory(url, **kw) as tmp:
        fs, path = filesystem(tmp)
        for name, data in files.items():
            fs.pipe(f"{path}/{name}", data)


def test_overwrite_swaps_and_leaves_nothing_beside(root):
    fs, parent, url = root
    _write(f"{url}/ds", {"M": b"1", "a": b"old"}, marker="M")
    with pytest.raises(UserError, match="already exists"):
        _write(f"{url}/ds", {"M": b"2"}, marker="M")
    _write(f"{url}/ds", {"M": b"2", "b": b"new"}, overwrite=True, marker="M")
    assert _names(fs, parent) == ["ds"] and _names(fs, f"{parent}/ds") == ["M", "b"]
    with pytest.raises(RuntimeError):  # a failed run changes nothing
        with atomic_directory(f"{url}/ds", overwrite=True, marker="M"):
            raise RuntimeError("crash")
    assert _names(fs, parent) == ["ds"] and fs.cat(f"{parent}/ds/b") == b"new"


def test_overwrite_replaces_only_what_carries_the_marker(root):
    fs, parent, url = root
    fs.makedirs(f"{parent}/mine", exist_ok=True)
    fs.pipe(f"{parent}/mine/photo.jpg", b"x")
    with pytest.raises(UserError, match=r"refusing to overwrite .*mine: it is not a collapse report \(no M in it\)"):
        _write(f"{url}/mine", {"M": b"1"}, overwrite=True, marker="M", what="collapse report")
    fs.pipe(f"{parent}/file", b"f")
    with pytest.raises(UserError, match=r"refusing to overwrite .*file: it is a file, not a dataset"):
        _write(f"{url}/file", {"M": b"1"}, overwrite=True, marker="M", what="dataset")
    assert fs.cat(f"{parent}/mine/photo.jpg") == b"x" and fs.cat(f"{parent}/file") == b"f"
    _write(f"{url}/mine", {"M": b"1"}, overwrite=True)  # no marker: the caller replaces anything, as before
    assert _names(fs, f"{parent}/mine") == ["M"]
    assert sorted(_names(fs, parent)) == ["file", "mine"]


def test_an_output_that_appears_meanwhile_is_kept(root):
    fs, parent, url = root
    with pytest.raises(UserError, match="already exists.*another run"):
        with atomic_directory(f"{url}/ds") as tmp:
            fs.makedirs(f"{parent}/ds", exist_ok=True)
            fs.pipe(f"{parent}/ds/theirs", b"t")
            filesystem(tmp)[0].pipe(filesystem(tmp)[1] + "/mine", b"m")
    assert _names(fs, parent) == ["ds"] and _names(fs, f"{parent}/ds") == ["theirs"]


def _owner(fs, path: str, **record) -> None:
    fs.pipe(path, json.dumps(record).encode())


def test_what_dead_runs_left_is_cleaned_or_restored_and_the_rest_reported(root, caplog):
    fs, parent, url = root
    here, dead = socket.gethostname(), dead_pid()
    _write(f"{url}/ds", {"M": b"old"}, marker="M")
    # a run that died mid-swap: the output renamed away, the new one not yet in place
    fs.mv(f"{parent}/ds", f"{parent}/ds.old-0000aaaa", recursive=True)
    fs.makedirs(f"{parent}/ds.tmp-0000aaaa", exist_ok=True)
    fs.pipe(f"{parent}/ds.tmp-0000aaaa/M", b"half")
    _owner(fs, f"{parent}/ds.tmp-0000aaaa.owner", host=here, pid=dead)
    # a run killed while writing; one on another host; one without an owner file (older code)
    fs.makedirs(f"{parent}/ds.tmp-0000bbbb", exist_ok=True)
    fs.pipe(f"{parent}/ds.tmp-0000bbbb/spill", b"s" * 5000)
    _owner(fs, f"{parent}/ds.tmp-0000bbbb.owner", host=here, pid=dead)
    fs.makedirs(f"{parent}/ds.tmp-0000cccc", exist_ok=True)
    fs.pipe(f"{parent}/ds.tmp-0000cccc/spill", b"s" * 1500)
    _owner(fs, f"{parent}/ds.tmp-0000cccc.owner", host="elsewhere", pid=1)
    fs.makedirs(f"{parent}/ds.tmp-0000dddd", exist_ok=True)
    fs.pipe(f"{parent}/ds.tmp-0000dddd/spill", b"s" * 2_000_000)
    # a live run: this very process
    fs.makedirs(f"{parent}/ds.tmp-0000eeee", exist_ok=True)
    _owner(fs, f"{parent}/ds.tmp-0000eeee.owner", host=here, pid=__import__("os").getpid())

    with caplog.at_level(logging.INFO, logger="trainer.atomic_output"):
        with pytest.raises(UserError, match="already exists"):  # the old output is back
            _write(f"{url}/ds", {"M": b"new"}, marker="M")
    assert fs.cat(f"{parent}/ds/M") == b"old"
    assert _names(fs, parent) == [
        "ds", "ds.tmp-0000cccc", "ds.tmp-0000cccc.owner", "ds.tmp-0000dddd", "ds.tmp-0000eeee", "ds.tmp-0000eeee.owner"
    ]
    log = caplog.text
    assert "restored" in log and "ds.old-0000aaaa" in log and "died mid-swap" in log
    assert "removed" in log and "ds.tmp-0000bbbb (5.0 kB)" in log and f"pid {dead} on host {here}" in log
    assert "ds.tmp-0000cccc (1.5 kB)" in log and "host elsewhere" in log
    assert "ds.tmp-0000dddd (2.0 MB)" in log and "no owner file" in log
    assert "ds.tmp-0000eeee is being written by another run" in log
    if not url.startswith("memory://"):
        assert f"rm -r {parent}/ds.tmp-0000dddd" in log
        assert f"rm -r {parent}/ds.tmp-0000cccc {parent}/ds.tmp-0000cccc.owner" in log


def test_refuse_overlap(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "day.tsv").write_text("x")
    src = str(tmp_path / "raw" / "day.tsv")
    for out, message in [(tmp_path / "raw", "contains the input"), (tmp_path, "contains the input"),
                         (tmp_path / "raw" / "day.tsv", "is the input"), (tmp_path / "raw" / "day.tsv" / "x", "inside")]:
        with pytest.raises(UserError, match=message):
            refuse_overlap(str(out), src)
    refuse_overlap(str(tmp_path / "rawdata"), src)  # a name that merely starts the same
    refuse_overlap("memory://raw", src)


def test_collapse_report_refuses_to_replace_a_directory_that_is_not_a_report(tmp_path):
    from trainer.collapse.analysis import CollapseReport
    from trainer.collapse.report import write_report

    report = CollapseReport(source="ckpt", label="me", fields=[], num_sets=1, dim=4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not a collapse report \(no collapse\.json"):
        write_report([report], str(tmp_path / "out"), overwrite=True, plots=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "out" / "notes.txt").unlink()
    write_report([report], str(tmp_path / "out"), overwrite=True, plots=False)
    write_report([report], str(tmp_path / "out"), overwrite=True, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((tmp_path / "out" / "collapse.json").read_text())["reports"][0]["label"] == "me"
