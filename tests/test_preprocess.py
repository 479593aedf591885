"""The preprocessor: real Criteo rows end to end, Avazu, gzip and memory:// I/O,
every kind of bad input (clear message with file:line, nothing left behind),
skip mode, chunk boundaries and determinism."""

from __future__ import annotations

import csv
import gzip
import math
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.preprocess import PreprocessConfig, main, preprocess
from trainer.data.raw_formats import AVAZU, CRITEO
from trainer.data.schema import DENSE_COLUMN, MISSING_ID, OOV_ID, SPLITS, read_schema
from trainer.data.splits import TRAIN, assign_splits, parse_split
from trainer.errors import UserError, run_cli

REAL_CRITEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "criteo_kaggle_train_head_10k.txt"


def _token(value: int) -> str:
    """The paper's integer transform, written out independently of trainer.data.transforms."""
    return str(value - 2 if value <= 2 else math.floor(math.log(value) ** 2))


def _criteo_rows(n: int, seed: int = 0) -> list[list[str]]:
    """Made-up Criteo-format rows: labels, small integers (some empty, some negative), 8-hex categoricals."""
    rng = np.random.default_rng(seed)
    pool = [f"{x:08x}" for x in rng.integers(0, 2**32, 12)]
    rows = []
    for _ in range(n):
        row = [str(rng.integers(0, 2))]
        row += ["" if rng.random() < 0.2 else str(rng.integers(-2, 60)) for _ in CRITEO.integer_fields]
        row += ["" if rng.random() < 0.1 else pool[min(rng.zipf(1.5), 12) - 1] for _ in CRITEO.categorical_fields]
        rows.append(row)
    return rows


def _write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def _config(input: Path | str, output: Path | str, **kw) -> PreprocessConfig:
    kw.setdefault("dataset", "criteo")
    kw.setdefault("progress", False)
    return PreprocessConfig(input=str(input), output=str(output), **kw)


def _split_table(root: Path | str, split: str) -> pa.Table:
    schema = read_schema(str(root))
    fs, path = fsspec.core.url_to_fs(str(root))
    tables = [pq.read_table(fs.open(f"{path}/{f}", "rb")) for f in schema.splits[split].files]
    return pa.concat_tables(tables)


def _vocab(root: Path, field: str) -> dict[str, tuple[int, int]]:
    t = pq.read_table(root / "vocab" / f"{field}.parquet")
    assert t.schema.field("token").type == "string" and t.schema.field("id").type == "int32"
    assert t.schema.field("count").type == "int64"
    return {tok: (i, c) for tok, i, c in zip(t["token"].to_pylist(), t["id"].to_pylist(), t["count"].to_pylist())}


# --- the real Criteo rows -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not REAL_CRITEO.exists():
        pytest.skip(f"real Criteo sample not found at {REAL_CRITEO} (it lives in ../shared beside the repo)")
    out = tmp_path_factory.mktemp("real") / "criteo"
    schema = preprocess(_config(REAL_CRITEO, out, files_per_split=1))
    with open(REAL_CRITEO, newline="") as f:
        raw = list(csv.reader(f, delimiter="\t"))
    return out, schema, raw


def test_real_criteo_rows_and_splits(real):
    out, schema, raw = real
    assert len(raw) == 10_000
    split = assign_splits(np.arange(len(raw)), parse_split("8,1,1"), 0)
    assert {s: schema.splits[s].rows for s in SPLITS} == {s: int((split == k).sum()) for k, s in enumerate(SPLITS)}
    assert sum(schema.splits[s].rows for s in SPLITS) == 10_000
    assert schema.recipe["rows_read"] == 10_000 and schema.recipe["bad_rows"]["count"] == 0
    assert schema.field_names == list(CRITEO.sparse_fields) and schema.dense_fields == list(CRITEO.integer_fields)
    assert schema.recipe["min_count"] == 10 and schema.recipe["vocabulary_from"] == "train"
    for s in SPLITS:
        assert _split_table(out, s).num_rows == schema.splits[s].rows


def test_real_criteo_vocabulary_counted_on_train_only(real):
    """Each vocabulary is exactly the train tokens with count >= 10, ids by descending count then token."""
    out, schema, raw = real
    split = assign_splits(np.arange(len(raw)), parse_split("8,1,1"), 0)
    train = [r for r, s in zip(raw, split) if s == TRAIN]
    for k, name in enumerate(CRITEO.sparse_fields):
        col = k + 1
        integer = name in CRITEO.integer_fields
        counts = Counter(_token(int(r[col])) if integer else r[col] for r in train if r[col] != "")
        kept = sorted(((-c, t) for t, c in counts.items() if c >= 10))
        expected = {t: (MISSING_ID + 1 + i, -c) for i, (c, t) in enumerate(kept)}
        assert _vocab(out, name) == expected, name
        assert schema.cardinality(name) == len(expected) + 2
    # a token seen only outside train never gets an id
    train_c3 = {r[16] for r in train}
    held_out_only = {r[16] for r in raw} - train_c3
    assert held_out_only and not held_out_only & set(_vocab(out, "C3"))


def test_real_criteo_ids_and_dense_row_by_row(real):
    """Every test row: ids from the vocabulary (OOV 0, missing 1) and dense = log1p(max(v, 0)), in file order."""
    out, schema, raw = real
    split = assign_splits(np.arange(len(raw)), parse_split("8,1,1"), 0)
    rows = [r for r, s in zip(raw, split) if SPLITS[s] == "test"]
    table = _split_table(out, "test")
    assert table["label"].to_pylist() == [int(r[0]) for r in rows]
    dense = np.array(table[DENSE_COLUMN].to_pylist(), dtype=np.float64)
    for k, name in enumerate(CRITEO.integer_fields):
        values = [r[k + 1] for r in rows]
        expected = [math.log1p(max(int(v), 0)) if v else 0.0 for v in values]
        np.testing.assert_allclose(dense[:, k], expected, rtol=1e-6)
    for k, name in enumerate(CRITEO.sparse_fields):
        vocab = _vocab(out, name)
        integer = name in CRITEO.integer_fields
        tokens = [(_token(int(r[k + 1])) if integer else r[k + 1]) if r[k + 1] else None for r in rows]
        expected = [MISSING_ID if t is None else vocab.get(t, (OOV_ID, 0))[0] for t in tokens]
        assert table[name].to_pylist() == expected, name
    # the transform on a few values, by hand: -1, 0, 1, 2 -> v - 2; 3 -> floor(1.0986^2) = 1; 1382 -> floor(7.2313^2) = 52
    assert [_token(v) for v in (-1, 0, 1, 2, 3, 1382)] == ["-3", "-2", "-1", "0", "1", "52"]
    oov = schema.recipe["oov_rate"]["test"]
    assert set(oov) == set(CRITEO.sparse_fields) and 0 < oov["C3"] < 1


# --- Avazu, gzip, memory:// ----------------------------------------------------------------


def _avazu_csv(path: Path, n: int = 300) -> list[list[str]]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        row = [str(10_000_000_000_000_000_000 + i), str(int(rng.random() < 0.3)), f"141021{rng.integers(0, 3):02d}"]
        row += [f"v{rng.integers(0, 6)}" if k % 2 else f"{rng.integers(0, 5):08x}" for k in range(21)]
        rows.append(row)
    path.write_text(",".join(AVAZU.columns) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return rows


def test_avazu_round_trip(tmp_path):
    rows = _avazu_csv(tmp_path / "train.csv")
    schema = preprocess(_config(tmp_path / "train.csv", tmp_path / "out", dataset="avazu", files_per_split=1))
    assert schema.dataset == "avazu" and schema.dense_fields == []
    assert schema.field_names == list(AVAZU.categorical_fields) and len(schema.field_names) == 22
    assert schema.recipe["min_count"] == 4 and schema.recipe["integer_transform"] is None
    split = assign_splits(np.arange(len(rows)), parse_split("8,1,1"), 0)
    train = [r for r, s in zip(rows, split) if s == TRAIN]
    test = [r for r, s in zip(rows, split) if SPLITS[s] == "test"]
    table = _split_table(tmp_path / "out", "test")
    assert DENSE_COLUMN not in table.column_names and "id" not in table.column_names
    assert table["label"].to_pylist() == [int(r[1]) for r in test]
    for k, name in enumerate(AVAZU.categorical_fields):
        counts = Counter(r[k + 2] for r in train)
        vocab = _vocab(tmp_path / "out", name)
        assert set(vocab) == {t for t, c in counts.items() if c >= 4}
        assert table[name].to_pylist() == [vocab.get(r[k + 2], (OOV_ID, 0))[0] for r in test]


def test_gzip_input_matches_plain(tmp_path):
    rows = _criteo_rows(400)
    plain = _write_tsv(tmp_path / "day.tsv", rows)
    (tmp_path / "day.tsv.gz").write_bytes(gzip.compress(plain.read_bytes()))
    preprocess(_config(plain, tmp_path / "a", min_count=2))
    preprocess(_config(tmp_path / "day.tsv.gz", tmp_path / "b", min_count=2))
    for s in SPLITS:
        assert _split_table(tmp_path / "a", s).equals(_split_table(tmp_path / "b", s))


def test_memory_filesystem_in_and_out():
    fs = fsspec.filesystem("memory")
    rows = _criteo_rows(300, seed=3)
    with fs.open("/pp-test/in.tsv", "w") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows))
    try:
        schema = preprocess(_config("memory:///pp-test/in.tsv", "memory:///pp-test/out", min_count=2))
        assert read_schema("memory:///pp-test/out") == schema
        assert sum(_split_table("memory:///pp-test/out", s).num_rows for s in SPLITS) == 300
        assert fs.exists("/pp-test/out/vocab/C1.parquet")
        assert not [p for p in fs.find("/pp-test") if "tmp" in p or "spill" in p]
    finally:
        fs.rm("/pp-test", recursive=True)


# --- bad input -------------------------------------------------------------------------------


def _criteo_with(tmp_path: Path, line: int, make_bad) -> Path:
    rows = _criteo_rows(30)
    rows[line - 1] = make_bad(rows[line - 1])
    return _write_tsv(tmp_path / "bad.tsv", rows)


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]


@pytest.mark.parametrize(
    "line, make_bad, message",
    [
        (7, lambda r: r[:-1], ":7: expected 40 columns, got 39"),
        (8, lambda r: r + ["x"], ":8: expected 40 columns, got 41"),
        (5, lambda r: r[:3] + ["abc"] + r[4:], ":5: I3 'abc' is not an integer"),
        (6, lambda r: r[:1] + ["1.5"] + r[2:], ":6: I1 '1.5' is not an integer"),
        (3, lambda r: ["2"] + r[1:], ":3: label '2' is not 0 or 1"),
        (4, lambda r: [""] + r[1:], ":4: label is empty"),
        (9, lambda r: [], ":9: empty line"),
    ],
)
def test_bad_row_fails_with_file_and_line(tmp_path, line, make_bad, message):
    bad = _criteo_with(tmp_path, line, make_bad)
    with pytest.raises(UserError, match="^" + str(bad).replace(".", r"\.") + message.replace(".", r"\.")):
        preprocess(_config(bad, tmp_path / "out"))
    _nothing_left(tmp_path)


def test_avazu_bad_header_and_row_lines_count_the_header(tmp_path):
    rows = _avazu_csv(tmp_path / "a.csv", 20)
    text = (tmp_path / "a.csv").read_text().splitlines()
    (tmp_path / "b.csv").write_text("\n".join(["id,click,when"] + text[1:]) + "\n")
    with pytest.raises(UserError, match=r"b\.csv:1: no column\(s\) \['hour', .*\]; the file's columns are \['id', 'click', 'when'\]"):
        preprocess(_config(tmp_path / "b.csv", tmp_path / "out", dataset="avazu"))
    text[5] = ",".join(rows[4][:-2])  # data row 5 is line 6
    (tmp_path / "c.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(UserError, match=r"c\.csv:6: expected 24 columns, got 22"):
        preprocess(_config(tmp_path / "c.csv", tmp_path / "out", dataset="avazu"))
    _nothing_left(tmp_path)


def test_bad_files_and_arguments(tmp_path):
    (tmp_path / "empty.tsv").write_bytes(b"")
    good = _write_tsv(tmp_path / "good.tsv", _criteo_rows(2000))
    packed = gzip.compress(good.read_bytes())
    (tmp_path / "cut.tsv.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "junk.tsv.gz").write_bytes(b"this is not gzip\n" * 10)
    (tmp_path / "header.csv").write_text(",".join(AVAZU.columns) + "\n")
    (tmp_path / "folder").mkdir()
    cases = [
        (_config(tmp_path / "header.csv", tmp_path / "out", dataset="avazu"), r"header\.csv: no usable data rows"),
        (_config(tmp_path / "folder", tmp_path / "out"), r"folder: cannot open"),
        (_config(tmp_path / "empty.tsv", tmp_path / "out"), r"empty\.tsv: empty file"),
        (_config(tmp_path / "cut.tsv.gz", tmp_path / "out"), r"cut\.tsv\.gz: cannot read .*truncated or corrupt"),
        (_config(tmp_path / "junk.tsv.gz", tmp_path / "out"), r"junk\.tsv\.gz: cannot read .*truncated or corrupt"),
        (_config(tmp_path / "nope.tsv", tmp_path / "out"), r"input not found: .*nope\.tsv"),
        (_config(good, tmp_path / "out", dataset="kaggle"), r"unknown dataset 'kaggle'"),
        (_config(good, tmp_path / "out", on_bad_rows="ignore"), r"--on-bad-rows must be one of"),
        (_config(good, tmp_path / "out", min_count=0), r"--min-count must be >= 1"),
        (_config(good, tmp_path / "out", split="1,1"), r"--split"),
    ]
    for config, message in cases:
        with pytest.raises(UserError, match=message):
            preprocess(config)
        _nothing_left(tmp_path)


def test_bytes_that_are_not_utf8(tmp_path):
    """Values are bytes until they enter a vocabulary: rare ones map to OOV, frequent ones are an error."""
    def write(name: str, rows: list[list[str]]) -> Path:
        (tmp_path / name).write_bytes("".join("\t".join(r) + "\n" for r in rows).encode("utf-8", "surrogateescape"))
        return tmp_path / name

    not_utf8 = "\udcff\udcfe\udcfd\udcfc" * 2  # bytes ff fe fd fc ff fe fd fc
    rows = _criteo_rows(200, seed=9)
    rare = [r[:25] + [not_utf8] + r[26:] if i == 3 else r for i, r in enumerate(rows)]
    schema = preprocess(_config(write("rare.tsv", rare), tmp_path / "out", min_count=2))
    assert schema.recipe["rows_read"] == 200 and schema.recipe["bad_rows"]["count"] == 0
    with pytest.raises(UserError, match=r"int\.tsv:1: I2 '1\\xff' is not an integer"):  # escaped, not U+FFFD
        preprocess(_config(write("int.tsv", [r[:2] + ["1\udcff"] + r[3:] for r in rows]), tmp_path / "out2"))
    with pytest.raises(UserError, match=r"freq\.tsv: field C1 has frequent values that are not UTF-8 text"):
        frequent = write("freq.tsv", [r[:14] + [not_utf8] + r[15:] for r in rows])
        preprocess(_config(frequent, tmp_path / "out3", min_count=2))
    assert not (tmp_path / "out3").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    good = _write_tsv(tmp_path / "good.tsv", _criteo_rows(100))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        preprocess(_config(good, tmp_path / "out", min_count=2))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match=r"refusing to overwrite .*out: it is not a dataset \(no schema\.json"):
        preprocess(_config(good, tmp_path / "out", min_count=2, overwrite=True))  # not ours to delete
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    preprocess(_config(good, tmp_path / "out", min_count=2, overwrite=True))  # an empty directory may be replaced
    first = (tmp_path / "out" / "schema.json").read_text()
    preprocess(_config(good, tmp_path / "out", min_count=3, overwrite=True))  # and so may a dataset
    assert (tmp_path / "out" / "schema.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tsv", "out"]


def _indexed_rows(n: int) -> list[list[str]]:
    """Rows whose I1 is their 0-based data-row index (readable back from the dense column)."""
    rows = _criteo_rows(n, seed=5)
    for i, r in enumerate(rows):
        r[1] = str(i)
    return rows


def _row_indices(root: Path, split: str) -> list[int]:
    dense = np.array(_split_table(root, split)[DENSE_COLUMN].to_pylist(), dtype=np.float64)
    return [int(round(v)) for v in np.expm1(dense[:, 0])]


def test_skip_mode_counts_bad_rows_and_keeps_row_indices_aligned(tmp_path):
    rows = _indexed_rows(250)
    rows[9] = rows[9][:-3]  # line 10: too few columns (dropped by the parser)
    rows[99] = ["7"] + rows[99][1:]  # line 100: bad label
    rows[199] = rows[199][:5] + ["x1"] + rows[199][6:]  # line 200: I5 not an integer
    bad = _write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(UserError, match=r"bad\.tsv:10: expected 40 columns, got 37"):
        preprocess(_config(bad, tmp_path / "out", min_count=2, files_per_split=1))
    for chunk_rows in (1 << 18, 64):  # one chunk, and bad rows in different chunks
        out = tmp_path / f"out-{chunk_rows}"
        schema = preprocess(
            _config(bad, out, min_count=2, files_per_split=1, on_bad_rows="skip", chunk_rows=chunk_rows, block_size=1 << 12)
        )
        recipe = schema.recipe
        assert recipe["rows_read"] == 250 and recipe["bad_rows"]["count"] == 3
        assert [e["where"] for e in recipe["bad_rows"]["examples"]] == [f"{bad}:10", f"{bad}:100", f"{bad}:200"]
        assert "not 0 or 1" in recipe["bad_rows"]["examples"][1]["reason"]
        split = assign_splits(np.arange(250), parse_split("8,1,1"), 0)
        for k, s in enumerate(SPLITS):
            expected = [i for i in range(250) if split[i] == k and i not in (9, 99, 199)]
            assert _row_indices(out, s) == expected
            assert recipe["rows"][s] == schema.splits[s].rows == len(expected)


def test_chunk_boundaries_do_not_change_the_output(tmp_path):
    """Many small chunks (with a non-8-byte value in one of them) give the same dataset as one chunk."""
    rows = _criteo_rows(600, seed=7)
    rows[450][20] = "short"  # C6: switches that chunk from the 8-byte hash path to strings
    src = _write_tsv(tmp_path / "in.tsv", rows)
    a = preprocess(_config(src, tmp_path / "a", min_count=3, files_per_split=1))
    b = preprocess(_config(src, tmp_path / "b", min_count=3, files_per_split=1, chunk_rows=50, block_size=4096))
    assert a == b
    for s in SPLITS:
        assert _split_table(tmp_path / "a", s).equals(_split_table(tmp_path / "b", s))
    for name in ("C6", "I2"):
        assert _vocab(tmp_path / "a", name) == _vocab(tmp_path / "b", name)


def test_same_seed_same_dataset_other_seed_other_split(tmp_path):
    src = _write_tsv(tmp_path / "in.tsv", _indexed_rows(400))
    preprocess(_config(src, tmp_path / "a", min_count=2))
    preprocess(_config(src, tmp_path / "b", min_count=2))
    preprocess(_config(src, tmp_path / "c", min_count=2, seed=1))
    assert (tmp_path / "a" / "schema.json").read_text() == (tmp_path / "b" / "schema.json").read_text()
    for s in SPLITS:
        assert _split_table(tmp_path / "a", s).equals(_split_table(tmp_path / "b", s))
    assert sorted(_row_indices(tmp_path / "a", "test")) != sorted(_row_indices(tmp_path / "c", "test"))


def test_cli_summary_and_errors(tmp_path, capsys):
    src = _write_tsv(tmp_path / "in.tsv", _criteo_rows(200))
    main(["--dataset", "criteo", "--input", str(src), "--output", str(tmp_path / "out"), "--min-count=2", "--no-progress"])
    printed = capsys.readouterr().out
    assert "200 rows" in printed and "train" in printed and "OOV rate" in printed
    with pytest.raises(SystemExit) as exit:
        run_cli(main, ["--dataset=criteo", f"--input={tmp_path / 'missing.tsv'}", f"--output={tmp_path / 'o2'}"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith("error: input not found")
