"""Nothing silently wrong, nothing lost, part 2 (issue 14): outputs that cannot be written, a
``meta.json`` edited after its checkpoint was written, a directory that merely holds a file named
like a tool's marker, predict's input and temporaries, and the work directories of killed
multi-worker preprocess runs. All in process (one subprocess for a read-only mount), a few
seconds in all.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shlex
import shutil
import socket
from pathlib import Path

import pytest

from tests.helpers import PYTHON, dead_pid, run, user_error
from trainer import checkpoint
from trainer.atomic_output import atomic_directory, atomic_files
from trainer.errors import UserError


# --- an output that cannot be written ---------------------------------------------------------


def _collapse(url: str, tmp_path: Path) -> None:
    from trainer.collapse.__main__ import main

    main(["--checkpoint", str(tmp_path / "no-such-checkpoint"), "--output", url, "--no-plots"])  # output checked first


def _atomic_directory(url: str, tmp_path: Path) -> None:
    with atomic_directory(url, marker="schema.json", what="dataset"):
        raise AssertionError("an unwritable output was handed out")


def _atomic_files(url: str, tmp_path: Path) -> None:
    with atomic_files([url, url + ".truth.parquet"], overwrite=False):
        raise AssertionError("an unwritable output was handed out")


@pytest.mark.parametrize("write", [_atomic_directory, _atomic_files, _collapse], ids=lambda f: f.__name__.strip("_"))
def test_an_output_below_a_file_is_a_clear_error(write, tmp_path):
    (tmp_path / "file").write_text("mine")
    url = str(tmp_path / "file" / "out")
    with pytest.raises(UserError, match=rf"cannot write {re.escape(url)}: {re.escape(str(tmp_path / 'file'))} is a file"):
        write(url, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_the_preprocess_cli_names_an_output_below_a_file(tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "day.tsv").write_text("0\t1" + "\t" * 38 + "\n")
    proc = run([PYTHON, "-m", "trainer.data.preprocess", "--dataset", "criteo", "--input", str(tmp_path / "day.tsv"),
                "--output", str(tmp_path / "file" / "out"), "--no-progress"])  # fmt: skip
    user_error(proc, f"cannot write {tmp_path / 'file' / 'out'}", "is a file")


_ON_A_READ_ONLY_MOUNT = """
import json, sys
from trainer.atomic_output import atomic_directory, atomic_files
from trainer.data.preprocess import PreprocessConfig, preprocess
from trainer.errors import UserError
mount, raw = sys.argv[1], sys.argv[2]
writers = {
    "atomic_directory": lambda: atomic_directory(mount + "/ds", marker="schema.json").__enter__(),
    "atomic_files": lambda: atomic_files([mount + "/day.tsv"], False).__enter__(),
    "preprocess": lambda: preprocess(PreprocessConfig(output=mount + "/ds", dataset="criteo", input=raw, progress=False)),
}
out = {}
for name, write in writers.items():
    try:
        write()
        out[name] = "wrote"
    except UserError as e:
        out[name] = "UserError: " + str(e)
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_an_output_on_a_read_only_mount_is_a_clear_error(tmp_path):
    """A real read-only file system, which stops root too (see tests/test_trainer_errors.py)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a read-only file system")
    mount = tmp_path / "ro"
    mount.mkdir()
    (tmp_path / "day.tsv").write_text("0\t1" + "\t" * 38 + "\n")
    cli = shlex.join([PYTHON, "-c", _ON_A_READ_ONLY_MOUNT, str(mount), str(tmp_path / "day.tsv")])
    proc = run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro none {shlex.quote(str(mount))} || exit 99; exec {cli}"])
    if proc.returncode == 99 or proc.stderr.startswith("unshare:"):
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result.startswith(f"UserError: cannot write {mount}/"), (name, result)
        assert "Read-only file system" in result, (name, result)


# --- meta.json is sealed ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_flipped_digit_in_meta_json_is_an_error_naming_the_file(tmp_path, caplog):
    import torch

    from trainer import dcp_io

    meta = {"progress": {"step": 12, "epoch": 0, "step_in_epoch": 12}, "identity": {"model": "dnn"}}
    url = dcp_io.save(str(tmp_path / "checkpoints"), 12, {"model": {"w": torch.arange(6.0)}}, meta)
    assert checkpoint.read_meta(url)["progress"] == meta["progress"]
    checkpoint.verify_files(url)
    meta_json = Path(url) / checkpoint.META
    text = meta_json.read_text()
    assert re.search(r'"step_in_epoch": 12\b', text)
    meta_json.write_text(text.replace('"step_in_epoch": 12', '"step_in_epoch": 13'))
    for read in (checkpoint.read_meta, checkpoint.verify_files):
        with pytest.raises(UserError, match=rf"{re.escape(str(meta_json))} does not match the sha256 recorded"):
            read(url)
    # a meta.json written before digests were recorded is read, with a warning
    older = json.loads(text)
    del older[checkpoint.DIGEST_KEY]
    meta_json.write_text(json.dumps(older))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert checkpoint.read_meta(url)["progress"]["step_in_epoch"] == 12
    assert "has no digest" in caplog.text


# --- --overwrite replaces only what the tool wrote ----------------------------------------------


@pytest.mark.parametrize("marker, content", [
    ("schema.json", '{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}'),
    ("schema.json", '{"version": 2, "dataset": "x", "sparse_fields": [], "dense_fields": [], "splits": {}}'),
    ("MANIFEST.json", '{"name": "my-app", "version": "1.0"}'),
    ("collapse.json", "[1, 2, 3]"),
    ("report.json", "not JSON at all"),
])  # fmt: skip
def test_overwrite_refuses_a_directory_whose_marker_another_program_wrote(marker, content, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text(content)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"refusing to overwrite .*out: .*its {re.escape(marker)} is not one this tool writes"):
        with atomic_directory(str(out), overwrite=True, marker=marker, what="thing"):
            raise AssertionError("the directory was handed out for replacing")
    assert sorted(p.name for p in out.iterdir()) == sorted([marker, "notes.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- predict: its input, non-UTF-8 rows and temporaries ----------------------------------------


def _predictor():
    """A Predictor with only its raw layout (reading rows and checking outputs need nothing else)."""
    from types import SimpleNamespace

    from trainer.export.runtime import Predictor, RawLayout

    predictor = Predictor.__new__(Predictor)
    columns = ("label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27)))
    predictor.transform = SimpleNamespace(layout=RawLayout(columns, "label", "\t", False, False))
    return predictor


@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz"])
def test_predict_names_a_row_that_is_not_utf8_by_file_and_line(suffix, tmp_path):
    from trainer.export.runtime import ArtifactError

    good = "\t".join(["1", *["5"] * 13, *["abc"] * 26]).encode()
    bad = b"0\t\xff\xfe\x1b[31m" + b"x" * 500 + b"\t" + b"\t".join([b""] * 38)
    path = tmp_path / f"day{suffix}"
    data = b"\n".join([good, good, bad, good]) + b"\n"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    _, rows = _predictor().read_rows(path, labeled=True)
    with pytest.raises(ArtifactError) as error:
        list(rows)
    message = str(error.value)
    assert message.startswith(f"{path}:3: not UTF-8 text: '0\\t\\xff\\xfe\\x1b[31mxxx"), message
    assert len(message) < len(str(path)) + 120 and "\x1b" not in message and message.isascii(), message


def test_predict_refuses_its_input_as_output_and_reports_stale_temporaries(tmp_path, caplog):
    from trainer.export.runtime import ArtifactError

    predictor, scores = _predictor(), tmp_path / "scores.csv"
    raw = tmp_path / "day.tsv"
    raw.write_text("row\n")
    (tmp_path / "link.tsv").symlink_to(raw)
    for output in (raw, tmp_path / "link.tsv"):
        with pytest.raises(ArtifactError, match=rf"output {re.escape(str(output))} is the input"):
            predictor.check_output(output, True, raw)
    assert raw.read_text() == "row\n"
    stale = tmp_path / ".scores.csv.tmp-0a1b2c3d"  # what a killed predict left
    stale.write_bytes(b"x" * 1234)
    with caplog.at_level(logging.WARNING, logger="predictor"):
        assert predictor.check_output(scores, False, raw) == scores
    assert "1 temporary of" in caplog.text and "1234 bytes" in caplog.text and f"rm {stale}" in caplog.text


# --- the work directories of multi-worker preprocess runs ---------------------------------------


def test_preprocess_removes_the_work_of_dead_runs_and_reports_the_rest(tmp_path, caplog):
    from trainer.data.preprocess import PreprocessConfig, shared_work

    raw = tmp_path / "day.tsv"
    raw.write_text("0\t1" + "\t" * 38 + "\n")
    config = PreprocessConfig(output=str(tmp_path / "out"), dataset="criteo", input=str(raw))
    work = tmp_path / "out.work"
    here = socket.gethostname()
    for run_id, owners in {"dead": [dead_pid(), dead_pid()], "live": [os.getpid()], "legacy": []}.items():
        (work / run_id / "_work").mkdir(parents=True)
        (work / run_id / "_work" / "spill.arrow").write_bytes(b"s" * 3000)
        for i, pid in enumerate(owners):
            (work / run_id / "_work" / f"owner-{i}.json").write_text(json.dumps({"host": here, "pid": pid}))
    with caplog.at_level(logging.INFO, logger="trainer.atomic_output"):
        assert shared_work(config, str(work), "now", worker=1) == str(work / "now")  # only worker 0 looks
        assert sorted(p.name for p in work.iterdir()) == ["dead", "legacy", "live"]
        assert shared_work(config, str(work), "now", worker=0) == str(work / "now")
    assert sorted(p.name for p in work.iterdir()) == ["legacy", "live"]
    assert f"removed {work / 'dead'}" in caplog.text
    report = next(line for line in caplog.text.splitlines() if "legacy" in line)
    assert "3.0 kB" in report and f"rm -r {work / 'legacy'}" in report
    for overlapping, what in ((tmp_path, f"input {raw}"), (raw, f"input {raw}"), (tmp_path / "out", f"output {tmp_path / 'out'}")):
        with pytest.raises(UserError, match=rf"--work {re.escape(str(overlapping))} overlaps the {re.escape(what)}"):
            shared_work(config, str(overlapping), "now", worker=0)
