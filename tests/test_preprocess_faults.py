"""``python -m trainer.data.preprocess`` when things go wrong ("nothing silently wrong, nothing lost"):

- bad rows of every kind (non-UTF-8 bytes, NUL bytes, wrong column counts, bad values, binary
  garbage, over-long lines) fail with ``file:line`` and an escaped, short excerpt, or are skipped
  and counted, with no traceback; the skipped dataset is the one of the file without those lines;
- a killed run's temporary is cleaned by the next run, a live run's is left alone, and a
  temporary nobody can vouch for is reported with its size and how to remove it;
- ``--overwrite`` swaps the new dataset in (a crash mid-swap leaves the old one recoverable);
- ``--overwrite`` refuses an output that holds the input or that is not a dataset.

Every run is the real CLI in a subprocess (about half a second each).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, cli_env, dead_pid, ok, run, user_error

REAL_CRITEO = ROOT.parent / "shared" / "data" / "criteo" / "criteo_kaggle_train_head_10k.txt"
_ESC = "\x1b"


@pytest.fixture(scope="module")
def real_lines() -> list[bytes]:
    """The first 3,000 lines of the real Criteo sample (without their newlines)."""
    if not REAL_CRITEO.exists():
        pytest.skip(f"real Criteo sample not found at {REAL_CRITEO} (it lives in ../shared beside the repo)")
    return REAL_CRITEO.read_bytes().split(b"\n")[:3000]


def _pp(src: Path, out: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The preprocess CLI, with stdout and stderr as bytes decoded leniently (so raw bytes would show)."""
    cmd = [PYTHON, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(src), "--output", str(out),
           "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, timeout=timeout)
    for stream in ("stdout", "stderr"):
        raw = getattr(proc, stream)
        assert raw.decode("utf-8", "strict") is not None  # raises on raw non-UTF-8 bytes echoed to the terminal
        setattr(proc, stream, raw.decode("utf-8"))
    return proc


def _clean_terminal(text: str, max_line: int = 400) -> None:
    """No traceback, nothing from the unraisable hook, no control characters, no long echoes."""
    assert "Traceback" not in text and "Exception ignored" not in text, text[-4000:]
    assert not any(c in text for c in ("\x00", "\r", _ESC, "\ufffd")), repr(text[-2000:])
    assert all(len(line) <= max_line for line in text.splitlines()), max(text.splitlines(), key=len)[:2000]


def _garbage(n: int, seed: int) -> bytes:
    """Random bytes without a newline: a line of binary garbage (tabs, CRs, NULs, invalid UTF-8 included)."""
    data = random.Random(seed).randbytes(n).replace(b"\n", b"\x80")
    assert n < 1000 or (b"\r" in data and b"\t" in data and b"\x00" in data)
    return data


def _bad_lines(good: list[bytes]) -> dict[str, bytes]:
    """One bad line of each kind, made from good line ``good[k]`` where that helps."""
    label, i = good[0].split(b"\t", 1)[0], good[1].split(b"\t")
    return {
        "columns_not_utf8": b"1\t\xff\xfe\tabc",
        "label_not_utf8": b"\xff" + good[2][1:],
        "nul_in_integer": b"\t".join(i[:3] + [b"\x0012"] + i[4:]),
        "nul_bytes": b"\x00\x00\x00",
        "too_many_columns": good[3] + b"\tx",
        "too_few_columns": b"\t".join(good[4].split(b"\t")[:-2]),
        "bad_label": b"7" + good[5][len(label):],
        "bad_integer": b"\t".join(good[6].split(b"\t")[:5] + [b"x1"] + good[6].split(b"\t")[6:]),
        "empty": b"",
        "garbage": _garbage(3000, 1),
        "garbage_40_columns": b"\t".join(_garbage(20, k).replace(b"\t", b"T").replace(b"\r", b"R") for k in range(40)),
        "carriage_return": good[7][:-4] + b"\r" + good[7][-4:],  # inside the last value: 40 columns
        "garbage_3mb": _garbage(3 << 20, 2),  # longer than a parse block
    }


_EXPECTED_REASON = {
    "columns_not_utf8": "expected 40 columns, got 3",
    "label_not_utf8": r"label '\xff' is not 0 or 1",
    "nul_in_integer": r"I3 '\x0012' is not an integer",
    "nul_bytes": "expected 40 columns, got 1",
    "too_many_columns": "expected 40 columns, got 41",
    "too_few_columns": "expected 40 columns, got 38",
    "bad_label": "label '7' is not 0 or 1",
    "bad_integer": "I5 'x1' is not an integer",
    "empty": "empty line",
    "garbage": "expected 40 columns",
    "garbage_40_columns": "label ",
    "carriage_return": "carriage return",
    "garbage_3mb": "longer than",
}


@pytest.mark.parametrize("kind", sorted(_EXPECTED_REASON))
def test_fail_names_file_and_line_of_every_kind_of_bad_row(real_lines, tmp_path, kind):
    line = 1234
    lines = list(real_lines)
    lines[line - 1] = _bad_lines(real_lines)[kind]
    src = tmp_path / "day.tsv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    proc = _pp(src, tmp_path / "out")
    message = user_error(proc, f"{src}:{line}: ", _EXPECTED_REASON[kind], "--on-bad-rows skip")
    _clean_terminal(proc.stderr)
    assert len(message) < 600, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day.tsv"]


def _parts(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_skip_drops_every_kind_of_bad_row_and_keeps_the_rest_exactly(real_lines, tmp_path):
    """Skipped and counted, ``file:line`` and escaped reasons in schema.json, and the dataset is,
    byte for byte, the one made from the file without the bad lines (all rows in train, so that the
    split, a function of the raw row index, cannot differ)."""
    bad = _bad_lines(real_lines)
    where = {kind: 100 + 211 * k for k, kind in enumerate(sorted(bad))}  # 1-based line numbers
    lines = list(real_lines)
    for kind, line in sorted(where.items(), key=lambda kv: kv[1]):  # ascending: later ones do not shift
        lines.insert(line - 1, bad[kind])
    assert [lines[where[k] - 1] for k in bad] == list(bad.values())
    (tmp_path / "bad").mkdir()
    (tmp_path / "clean").mkdir()
    src = tmp_path / "bad" / "day.tsv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "clean" / "day.tsv").write_bytes(b"\n".join(real_lines) + b"\n")

    args = ["--min-count", "3", "--split", "1,0,0", "--files-per-split", "1"]
    fail = _pp(src, tmp_path / "failed", *args)
    user_error(fail, f"{src}:{min(where.values())}: ")
    _clean_terminal(fail.stderr)

    skip = ok(_pp(src, tmp_path / "skipped", *args, "--on-bad-rows", "skip"))
    _clean_terminal(skip.stdout + skip.stderr)
    assert f"bad rows skipped: {len(bad)}" in skip.stdout
    clean = ok(_pp(tmp_path / "clean" / "day.tsv", tmp_path / "expected", *args))

    got = json.loads((tmp_path / "skipped" / "schema.json").read_text())
    want = json.loads((tmp_path / "expected" / "schema.json").read_text())
    bad_rows = got["recipe"].pop("bad_rows")
    assert bad_rows["policy"] == "skip" and bad_rows["count"] == len(bad)
    first = sorted(where.items(), key=lambda kv: kv[1])[:5]
    assert [e["where"] for e in bad_rows["examples"]] == [f"{src}:{line}" for _, line in first]
    for (kind, _), example in zip(first, bad_rows["examples"]):
        assert _EXPECTED_REASON[kind] in example["reason"] and len(example["reason"]) < 300
        assert example["reason"].isprintable(), example
    assert got["recipe"].pop("rows_read") == len(real_lines) + len(bad)
    assert want["recipe"].pop("rows_read") == len(real_lines)
    want["recipe"].pop("bad_rows")
    assert got["recipe"].pop("input") == str(src)
    want["recipe"].pop("input")
    assert got == want
    assert got["splits"]["train"]["rows"] == len(real_lines)
    skipped, expected = _parts(tmp_path / "skipped"), _parts(tmp_path / "expected")
    assert sorted(skipped) == sorted(expected) and "train/part-00000.parquet" in skipped
    for name in expected:
        assert skipped[name] == expected[name], name
    assert clean.stdout.splitlines()[2:5] == skip.stdout.splitlines()[2:5]  # splits, ids, OOV


# --- temporaries of killed and live runs ----------------------------------------------------------


def _write_rows(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_next_run_cleans_a_dead_runs_temporary_and_reports_one_without_owner(real_lines, tmp_path):
    src = _write_rows(tmp_path / "day.tsv", real_lines[:500])
    dead = tmp_path / "out.tmp-0000dead"
    (dead / "vocab").mkdir(parents=True)
    (dead / "_spill.arrow").write_bytes(b"x" * 300_000)
    (tmp_path / "out.tmp-0000dead.owner").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    unowned = tmp_path / "out.tmp-0f0e0d0c"  # as the code before owner files left it
    unowned.mkdir()
    (unowned / "_spill.arrow").write_bytes(b"y" * 2_500_000)
    other = tmp_path / "other.tmp-0000dead"  # another output's: not ours to touch
    other.mkdir()

    proc = ok(_pp(src, tmp_path / "out", "--min-count", "2"))
    assert not dead.exists() and not (tmp_path / "out.tmp-0000dead.owner").exists()
    assert "out.tmp-0000dead" in proc.stderr and "removed" in proc.stderr
    assert unowned.exists() and other.exists()
    report = [line for line in proc.stderr.splitlines() if "out.tmp-0f0e0d0c" in line]
    assert report and "2.5 MB" in report[0] and f"rm -r {unowned}" in report[0], proc.stderr
    assert (tmp_path / "out" / "schema.json").exists()


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _start_blocked_run(fifo: Path, out: Path) -> subprocess.Popen:
    """A run reading a FIFO nobody writes: it has created its temporary and waits on its input."""
    cmd = [PYTHON, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(fifo), "--output", str(out),
           "--no-progress", "--min-count", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".tmp-") and p.is_dir()]:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never created its temporary directory"
        time.sleep(0.05)
    return proc


def _temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_a_killed_runs_temporary_is_removed_by_the_next_run(real_lines, tmp_path):
    src = _write_rows(tmp_path / "day.tsv", real_lines[:500])
    out = tmp_path / "out"
    victim = _start_blocked_run(_mkfifo(tmp_path / "pipe.tsv"), out)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert _temporaries(out), "the killed run left no temporary"
    proc = ok(_pp(src, out, "--min-count", "2"))
    assert _temporaries(out) == [], proc.stderr
    assert "removed" in proc.stderr and f"pid {victim.pid}" in proc.stderr
    assert (out / "schema.json").exists()


def test_a_live_runs_temporary_is_left_alone(real_lines, tmp_path):
    src = _write_rows(tmp_path / "day.tsv", real_lines[:500])
    out = tmp_path / "out"
    live = _start_blocked_run(_mkfifo(tmp_path / "pipe.tsv"), out)
    try:
        before = _temporaries(out)
        proc = ok(_pp(src, out, "--min-count", "2"))
        assert (out / "schema.json").exists()
        assert set(before) <= set(_temporaries(out)), proc.stderr
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()


# --- --overwrite: the swap, and what it may replace -----------------------------------------------

_CRASH_IN_SWAP = """
import os, runpy, sys
out = sys.argv[1]
rename = os.rename
def crashing_rename(src, dst, *a, **k):
    if ".tmp-" in os.path.basename(os.fspath(src)) and os.fspath(dst).rstrip("/") == out:
        os._exit(9)  # killed just before the new dataset is renamed into place
    return rename(src, dst, *a, **k)
os.rename = crashing_rename
sys.argv = ["preprocess", *sys.argv[2:]]
runpy.run_module("trainer.data.preprocess", run_name="__main__")
"""


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_overwrite_crashing_mid_swap_keeps_a_complete_dataset(real_lines, tmp_path):
    a = _write_rows(tmp_path / "a.tsv", real_lines[:400])
    b = _write_rows(tmp_path / "b.tsv", real_lines[400:900])
    out = tmp_path / "out"
    ok(_pp(a, out, "--min-count", "2"))
    original = _digest(out)

    args = ["--dataset", "criteo", "--input", str(b), "--output", str(out), "--no-progress", "--min-count", "2",
            "--overwrite"]
    crashed = run([PYTHON, "-c", _CRASH_IN_SWAP, str(out), *args])
    assert crashed.returncode == 9, crashed.stderr[-3000:]

    # the next run without --overwrite finds the old dataset (restored if need be), intact
    again = _pp(b, out, "--min-count", "2")
    user_error(again, "already exists", str(out))
    assert _digest(out) == original
    # and with --overwrite it replaces it, leaving nothing else behind
    ok(_pp(b, out, "--min-count", "2", "--overwrite"))
    assert json.loads((out / "schema.json").read_text())["recipe"]["input"] == str(b)
    assert _temporaries(out) == []


def test_overwrite_refuses_an_output_that_holds_the_input(real_lines, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    src = _write_rows(raw / "day.tsv", real_lines[:300])
    (raw / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(raw)
    for out, needle in [
        (raw, "contains the input"),
        (tmp_path, "contains the input"),
        (src, "is the input"),
        (tmp_path / "link", "contains the input"),
    ]:
        proc = _pp(src, out, "--min-count", "2", "--overwrite")
        user_error(proc, str(out), needle)
        assert src.read_bytes() == b"\n".join(real_lines[:300]) + b"\n" and (raw / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in raw.iterdir()) == ["day.tsv", "notes.txt"]


def test_overwrite_refuses_a_directory_that_is_not_a_dataset(real_lines, tmp_path):
    src = _write_rows(tmp_path / "day.tsv", real_lines[:300])
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    proc = _pp(src, home, "--min-count", "2", "--overwrite")
    user_error(proc, str(home), "not a dataset", "schema.json")
    assert (home / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"
    (tmp_path / "file").write_text("a file")
    user_error(_pp(src, tmp_path / "file", "--min-count", "2", "--overwrite"), str(tmp_path / "file"), "not a dataset")
    assert (tmp_path / "file").read_text() == "a file"
    # an empty directory and a dataset this tool wrote may be replaced
    (tmp_path / "empty").mkdir()
    ok(_pp(src, tmp_path / "empty", "--min-count", "2", "--overwrite"))
    ok(_pp(src, tmp_path / "empty", "--min-count", "3", "--overwrite"))
    assert json.loads((tmp_path / "empty" / "schema.json").read_text())["recipe"]["min_count"] == 3


# --- in process: many bad lines across small blocks and chunks, Avazu, an all-empty column ----------


def _tables(root: Path) -> dict[str, object]:
    import pyarrow.parquet as pq

    return {name: pq.read_table(root / name) for name in _parts(root)}


def test_many_bad_lines_across_small_blocks_give_the_clean_dataset(real_lines, tmp_path):
    from trainer.data.preprocess import PreprocessConfig, preprocess

    good = real_lines[:1500]
    kinds = list(_bad_lines(good).items())
    rng = random.Random(3)
    lines, bad = [], 0
    for k, line in enumerate(good):
        if rng.random() < 0.05:
            kind, content = kinds[rng.randrange(len(kinds) - 1)]  # not the 3 MB one
            lines.append(content[:3000])
            bad += 1
        lines.append(line)
    src = _write_rows(tmp_path / "bad.tsv", lines)
    clean = _write_rows(tmp_path / "clean.tsv", good)
    common = dict(dataset="criteo", split="1,0,0", min_count=2, files_per_split=1, progress=False)
    got = preprocess(PreprocessConfig(input=str(src), output=str(tmp_path / "a"), on_bad_rows="skip",
                                      block_size=4096, chunk_rows=64, **common))
    want = preprocess(PreprocessConfig(input=str(clean), output=str(tmp_path / "b"), **common))
    assert got.recipe["bad_rows"]["count"] == bad > 40 and got.recipe["rows_read"] == len(lines)
    assert got.splits == want.splits and got.sparse_fields == want.sparse_fields
    a, b = _tables(tmp_path / "a"), _tables(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].equals(b[name]), name


def test_avazu_quoted_lines_that_are_not_utf8(tmp_path):
    from trainer.data.preprocess import PreprocessConfig, preprocess
    from trainer.data.raw_formats import AVAZU
    from trainer.errors import UserError

    header = ",".join(AVAZU.columns).encode()
    rows = [b",".join([b"%d" % (10**19 + i), b"%d" % (i % 2)] + [b"v%d" % ((i * k) % 5) for k in range(22)])
            for i in range(200)]
    lines = [header, *rows[:50], b'1,0,"\xff,a",b', *rows[50:100], b'2,1,"\xfe,x"' + b",y" * 21, *rows[100:]]
    src = tmp_path / "train.csv"
    src.write_bytes(b"\n".join(lines) + b"\n")
    config = dict(dataset="avazu", input=str(src), min_count=2, progress=False)
    with pytest.raises(UserError, match=r"train\.csv:52: expected 24 columns, got 4 \(not UTF-8 text\)"):
        preprocess(PreprocessConfig(output=str(tmp_path / "a"), **config))
    schema = preprocess(PreprocessConfig(output=str(tmp_path / "b"), on_bad_rows="skip", **config))
    recipe = schema.recipe
    assert recipe["rows_read"] == 202 and recipe["bad_rows"]["count"] == 1  # the quoted "\xfe,x" row has 24 columns
    assert sum(s.rows for s in schema.splits.values()) == 201
    (tmp_path / "h.csv").write_bytes(header + b"\xff\n" + b"\n".join(rows) + b"\n")
    with pytest.raises(UserError, match=r"h\.csv:1: header is not the avazu layout: not UTF-8 text: 'id,click"):
        preprocess(PreprocessConfig(output=str(tmp_path / "c"), **{**config, "input": str(tmp_path / "h.csv")}))


def test_a_column_empty_in_every_row(real_lines, tmp_path):
    """Used to stop with IndexError ('Chunk index out of range') in the 8-byte hash path."""
    rows = [line.rsplit(b"\t", 1)[0] + b"\t" for line in real_lines[:400]]  # C26 always empty
    proc = ok(_pp(_write_rows(tmp_path / "day.tsv", rows), tmp_path / "out", "--min-count", "2"))
    _clean_terminal(proc.stderr)
    schema = json.loads((tmp_path / "out" / "schema.json").read_text())
    assert {f["name"]: f["cardinality"] for f in schema["sparse_fields"]}["C26"] == 2  # OOV and missing only
