"""The dataset spec (``trainer.data.dataset_spec``) through the preprocessor: the shipped
Criteo and Avazu specs against a direct computation (same bytes), every column type,
every split kind, hash buckets, multi-worker runs (same bytes), and every spec error.
Tiny files, in process."""

from __future__ import annotations

import math
import subprocess
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import PYTHON, ROOT
from trainer.data.dataset_spec import shipped_names, shipped_spec, spec_from_dict
from trainer.data import vocabulary as vocabulary_module
from trainer.data.hashing import bucket_ids, hash_tokens
from trainer.data.preprocess import PreprocessConfig, preprocess, run_worker
from trainer.data.raw_formats import AVAZU, CRITEO
from trainer.data.schema import MISSING_ID, OOV_ID, SPLITS, read_schema
from trainer.data.splits import TEST, TRAIN, VAL, assign_splits, file_key
from trainer.data.transforms import criteo_integer_token
from trainer.data.vocabulary import VocabularyLookup, build_vocabulary, write_vocabulary
from trainer.data.writer import DatasetWriter, make_table
from trainer.errors import UserError


def _table(root: Path, split: str) -> pa.Table:
    schema = read_schema(str(root))
    return pa.concat_tables([pq.read_table(root / f) for f in schema.splits[split].files])


def _spec_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _run(tmp_path: Path, spec: dict, out: str = "out", **kw) -> tuple[Path, object]:
    schema = preprocess(PreprocessConfig(output=str(tmp_path / out), spec=_spec_file(tmp_path, spec), progress=False, **kw))
    return tmp_path / out, schema


# --- the shipped specs -----------------------------------------------------------------------


def test_shipped_specs_load_and_keep_the_known_layouts():
    assert {"criteo", "avazu", "criteo_1tb", "criteo_kaggle_csv"} <= set(shipped_names())
    criteo, kaggle_csv, tb = shipped_spec("criteo"), shipped_spec("criteo_kaggle_csv"), shipped_spec("criteo_1tb")
    assert [c.name for c in criteo.fields] == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert [c.name for c in criteo.dense_columns] == [f"I{i}" for i in range(1, 14)]
    assert [c.name for c in kaggle_csv.fields] == [c.name for c in criteo.fields] and kaggle_csv.input.header
    assert [c.name for c in tb.columns] == [c.name for c in criteo.columns] and tb.split.kind == "files"
    assert CRITEO.columns == ("label", *CRITEO.sparse_fields) and CRITEO.delimiter == "\t" and not CRITEO.quoted
    assert AVAZU.columns[:2] == ("id", "click") and len(AVAZU.categorical_fields) == 22 and AVAZU.dropped == ("id",)


def _direct(rows: list[list[str]], spec_name: str, root: Path) -> None:
    """The dataset of ``rows`` (every file column as text) computed here, written by the same writer."""
    spec = shipped_spec(spec_name)
    names = [c.name for c in spec.columns]
    n = len(rows)
    r = spec.split.ratios
    split = assign_splits(np.arange(n), (r[0] / sum(r), r[1] / sum(r), r[2] / sum(r)), spec.split.seed)
    ids, dense = {}, []
    for c in spec.fields:
        values = [row[names.index(c.name)] for row in rows]
        if c.token == "criteo_log":
            tokens = [str(int(criteo_integer_token(np.array([int(v)]))[0])) if v else None for v in values]
            dense.append([math.log1p(max(int(v), 0)) if v else 0.0 for v in values])
        else:
            tokens = [v or None for v in values]
        counts = Counter(t for t, s in zip(tokens, split) if s == TRAIN and t is not None)
        kept = sorted((-k, t) for t, k in counts.items() if k >= spec.min_count(c))
        vocab = {t: MISSING_ID + 1 + i for i, (_, t) in enumerate(kept)}
        ids[c.name] = np.array([MISSING_ID if t is None else vocab.get(t, OOV_ID) for t in tokens])
        table = pa.table({"token": pa.array([t.encode() for _, t in kept], pa.binary()),
                          "id": pa.array(list(vocab.values()), pa.int32()), "count": pa.array([-k for k, _ in kept], pa.int64())})  # fmt: skip
        write_vocabulary(str(root), c.name, table, "direct")
    labels = np.array([int(row[names.index(spec.label.name)]) for row in rows])
    dense_array = np.array(dense, dtype=np.float32).T if dense else None
    writer = DatasetWriter(str(root), files_per_split=1)
    for s, name in enumerate(SPLITS):
        rows_s = split == s
        writer.write(name, make_table(labels[rows_s], {k: v[rows_s] for k, v in ids.items()},
                                      None if dense_array is None else dense_array[rows_s]))  # fmt: skip
    writer.close()


def _same_bytes(a: Path, b: Path) -> list[str]:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.parquet"))
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*.parquet")) and files
    return [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]


def test_shipped_criteo_and_avazu_specs_write_the_bytes_of_a_direct_computation(tmp_path):
    rng = np.random.default_rng(3)
    pool = [f"{x:08x}" for x in rng.integers(0, 2**32, 9)]
    criteo = [[str(rng.integers(0, 2))] + ["" if rng.random() < 0.2 else str(rng.integers(-2, 40)) for _ in range(13)]
              + ["" if rng.random() < 0.1 else pool[min(rng.zipf(1.6), 9) - 1] for _ in range(26)] for _ in range(400)]  # fmt: skip
    (tmp_path / "c.tsv").write_text("".join("\t".join(r) + "\n" for r in criteo))
    avazu = [[str(10**19 + i), str(int(rng.random() < 0.3))] + [f"v{rng.integers(0, 6)}" for _ in range(22)] for i in range(400)]
    (tmp_path / "a.csv").write_text(",".join(AVAZU.columns) + "\n" + "".join(",".join(r) + "\n" for r in avazu))
    for name, rows, raw in (("criteo", criteo, "c.tsv"), ("avazu", avazu, "a.csv")):
        preprocess(PreprocessConfig(output=str(tmp_path / name), dataset=name, input=str(tmp_path / raw),
                                    files_per_split=1, progress=False))  # fmt: skip
        _direct(rows, name, tmp_path / f"{name}-direct")
        assert _same_bytes(tmp_path / name, tmp_path / f"{name}-direct") == [], name


# --- column types, hashing -------------------------------------------------------------------


def _hash_reference(token: bytes) -> int:
    """The documented hash, in plain Python: splitmix64 folded over 8-byte little-endian words."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    h = len(token)
    for j in range(0, len(token), 8):
        h = mix(h ^ int.from_bytes(token[j : j + 8].ljust(8, b"\0"), "little"))
    return h


def test_hash_buckets_are_the_documented_stable_hash():
    tokens = [b"", b"a", b"abcdefgh", b"abcdefghi", "\u00e9t\u00e9".encode(), b"x" * 40]
    array = pa.array(tokens, pa.binary())
    expected = [MISSING_ID + 1 + _hash_reference(t) % 1000 for t in tokens]
    assert bucket_ids(array, 1000).tolist() == expected
    assert bucket_ids(array.slice(2), 1000).tolist() == expected[2:]  # an offset array: same ids


def test_vocabulary_lookup_gives_each_token_its_id_even_when_hashes_collide(monkeypatch):
    rng = np.random.default_rng(5)
    words = sorted({bytes(rng.integers(0, 256, rng.integers(0, 20)).astype(np.uint8)) for _ in range(400)})
    counts = pa.table({"token": pa.array(words[:300], pa.binary()), "count": pa.array(rng.integers(1, 9, 300), pa.int64())})
    vocabulary = build_vocabulary(counts, 3)
    id_of = dict(zip(vocabulary["token"].to_pylist(), vocabulary["id"].to_pylist()))
    assert 0 < len(id_of) < len(words)

    def check(chunk: list[bytes]) -> None:  # the spill's dictionary layout: the missing value last
        column = pa.array([*chunk, None], pa.binary()).dictionary_encode(null_encoding="encode")
        expected = [id_of.get(w, OOV_ID) for w in chunk] + [MISSING_ID]
        assert VocabularyLookup(vocabulary).entry_ids(column).tolist() == expected
        assert VocabularyLookup(build_vocabulary(counts, 99)).entry_ids(column).tolist() == [OOV_ID] * len(chunk) + [MISSING_ID]

    small = words[::10]  # a chunk of 40 tokens: the vocabulary's hash index; all 400: a set built for the chunk
    check(small), check(words)
    weak = lambda tokens: hash_tokens(tokens) % np.uint64(256)  # noqa: E731 - a hash many tokens share
    sharing = Counter(weak(vocabulary["token"].combine_chunks()).tolist()).values()
    assert min(sharing) == 1 and max(sharing) > 2  # tokens alone on their hash, and tokens sharing one
    monkeypatch.setattr(vocabulary_module, "hash_tokens", weak)
    check(small)


def _csv_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        tags = [f"t{rng.integers(0, 6)}" for _ in range(rng.integers(0, 6))]
        rows.append({
            "id": str(i), "click": str(int(rng.random() < 0.4)), "user": f"u{min(rng.zipf(1.5), 9)}",
            "site": "" if rng.random() < 0.1 else f"s{rng.integers(0, 50)}",
            "tags": "" if rng.random() < 0.1 else "|".join(tags) + ("|" if rng.random() < 0.2 else ""),
            "price": "" if rng.random() < 0.1 else f"{rng.random() * 20:.3f}",
            "cnt": str(rng.integers(0, 30)), "note": "free text, ignored",
        })  # fmt: skip
    return rows


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    cols = list(rows[0])
    body = "".join(",".join(f'"{r[c]}"' if "," in r[c] else r[c] for c in cols) + "\n" for r in rows)
    path.write_text(",".join(cols) + "\n" + body)


_CSV_SPEC = {
    "name": "mixed",
    "input": {"format": "csv", "header": True},
    "columns": [
        {"name": "click", "type": "label"},
        {"name": "user", "type": "categorical", "min_count": 2},
        {"name": "site", "type": "categorical", "hash_buckets": 7},
        {"name": "tags", "type": "multi_hot", "separator": "|", "max_length": 3, "pooling": "mean"},
        {"name": "price", "type": "numeric", "token": "buckets", "boundaries": [1.0, 10.0], "dense": "identity"},
        {"name": "cnt", "type": "numeric", "token": "criteo_log", "dense": "log1p"},
        {"name": "id", "type": "ignore"},
    ],
    "defaults": {"min_count": 1},
}


def test_every_column_type_from_a_csv_with_a_header(tmp_path):
    rows = _csv_rows(300)
    _write_csv(tmp_path / "x.csv", rows)
    out, schema = _run(tmp_path, _CSV_SPEC, input=str(tmp_path / "x.csv"), files_per_split=1)
    assert [(f.name, f.max_length, f.pooling) for f in schema.sparse_fields] == [
        ("user", 1, "sum"), ("site", 1, "sum"), ("tags", 3, "mean"), ("price", 1, "sum"), ("cnt", 1, "sum")]
    assert schema.cardinality("site") == 7 + 2 and not (out / "vocab" / "site.parquet").exists()  # hashed: no vocabulary
    assert schema.dense_fields == ["price", "cnt"] and schema.recipe["spec"]["name"] == "mixed"
    split = assign_splits(np.arange(len(rows)), (0.8, 0.1, 0.1), 0)
    train = [r for r, s in zip(rows, split) if s == TRAIN]

    def vocab(tokens: list[str], min_count: int) -> dict[str, int]:
        kept = sorted((-k, t) for t, k in Counter(tokens).items() if k >= min_count)
        return {t: MISSING_ID + 1 + i for i, (_, t) in enumerate(kept)}

    def tag_list(v: str) -> list[str]:
        return [t for t in v.split("|") if t][:3]

    def bucket(v: str) -> str:
        return str(int(float(v) >= 1.0) + int(float(v) >= 10.0))

    user_v = vocab([r["user"] for r in train], 2)
    tags_v = vocab([t for r in train for t in tag_list(r["tags"])], 1)
    price_v = vocab([bucket(r["price"]) for r in train if r["price"]], 1)
    cnt_v = vocab([str(int(criteo_integer_token(np.array([int(r["cnt"])]))[0])) for r in train], 1)
    for s, name in enumerate(SPLITS):
        got = _table(out, name).to_pylist()
        want = [r for r, k in zip(rows, split) if k == s]
        assert len(got) == len(want) and got
        for g, r in zip(got, want):
            assert g["label"] == int(r["click"])
            assert g["user"] == user_v.get(r["user"], OOV_ID)
            assert g["site"] == (MISSING_ID if not r["site"] else MISSING_ID + 1 + _hash_reference(r["site"].encode()) % 7)
            assert g["tags"] == [tags_v.get(t, OOV_ID) for t in tag_list(r["tags"])]
            assert g["price"] == (MISSING_ID if not r["price"] else price_v.get(bucket(r["price"]), OOV_ID))
            assert g["cnt"] == cnt_v.get(str(int(criteo_integer_token(np.array([int(r["cnt"])]))[0])), OOV_ID)
            assert g["dense"][0] == pytest.approx(float(r["price"]) if r["price"] else 0.0, rel=1e-6)
            assert g["dense"][1] == pytest.approx(math.log1p(int(r["cnt"])), rel=1e-6)
    assert pq.read_schema(out / schema.splits["train"].files[0]).field("tags").type == pa.list_(pa.int32())


def test_a_custom_delimiter_reads_as_the_default_one(tmp_path):
    rows = _csv_rows(200, seed=4)
    _write_csv(tmp_path / "comma.csv", rows)
    cols = list(rows[0])
    (tmp_path / "semi.csv").write_text("".join(";".join(r[c] for c in cols) + "\n" for r in [dict(zip(cols, cols)), *rows]))
    comma, _ = _run(tmp_path, _CSV_SPEC, out="comma", input=str(tmp_path / "comma.csv"))
    semi_spec = {**_CSV_SPEC, "input": {**_CSV_SPEC["input"], "delimiter": ";"}}
    semi, schema = _run(tmp_path, semi_spec, out="semi", input=str(tmp_path / "semi.csv"))
    assert schema.recipe["spec"]["input"]["delimiter"] == ";" and schema.recipe["rows_read"] == len(rows)
    assert _same_bytes(comma, semi) == []  # the note column's "free text, ignored" is one value in both


def _ads_parquet(root: Path, days: int = 3, n: int = 120, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(days):
        pq.write_table(pa.table({
            "click": pa.array(rng.integers(0, 2, n), pa.int64()),
            "user": pa.array(rng.integers(0, 9, n), pa.int64()),
            "history": [[f"c{x}" for x in rng.integers(0, 12, rng.integers(0, 5))] for _ in range(n)],
            "price": rng.random(n) * 30,
            "hour": np.full(n, d * 24) + rng.integers(0, 24, n),
        }), root / f"day_{d}.parquet", row_group_size=50)  # fmt: skip


_ADS_SPEC = {
    "name": "ads",
    "input": {"format": "parquet"},
    "columns": [
        {"name": "click", "type": "label"},
        {"name": "user", "type": "categorical"},
        {"name": "history", "type": "multi_hot", "max_length": 3, "pooling": "sum"},
        {"name": "price", "type": "numeric", "dense": "log1p"},
        {"name": "hour", "type": "ignore"},
    ],
    "split": {"kind": "time", "time": {"column": "hour", "train_before": 48, "val_before": 60}},
}


def test_parquet_list_column_and_time_split(tmp_path):
    _ads_parquet(tmp_path / "raw")
    out, schema = _run(tmp_path, _ADS_SPEC, input=str(tmp_path / "raw" / "day_*.parquet"))
    raw = pa.concat_tables([pq.read_table(tmp_path / "raw" / f"day_{d}.parquet") for d in range(3)]).to_pylist()
    want = {TRAIN: [r for r in raw if r["hour"] < 48], VAL: [r for r in raw if 48 <= r["hour"] < 60],
            TEST: [r for r in raw if r["hour"] >= 60]}  # fmt: skip
    vocab_rows = pq.read_table(out / "vocab" / "history.parquet").to_pylist()
    history = {v["token"]: v["id"] for v in vocab_rows}
    assert sum(v["count"] for v in vocab_rows) == sum(len(r["history"][:3]) for r in want[TRAIN])
    for s, name in enumerate(SPLITS):
        got = _table(out, name).to_pylist()
        assert [g["label"] for g in got] == [r["click"] for r in want[s]]
        assert [g["history"] for g in got] == [[history.get(t, OOV_ID) for t in r["history"][:3]] for r in want[s]]
        assert [g["user"] for g in got] == [MISSING_ID + 1 + sorted(
            Counter(str(x["user"]) for x in want[TRAIN]).items(), key=lambda kv: (-kv[1], kv[0])).index(
            (str(r["user"]), Counter(str(x["user"]) for x in want[TRAIN])[str(r["user"])])) for r in want[s]]  # fmt: skip
    assert schema.recipe["split"] == "time" and schema.cardinality("history") == len(history) + 2
    hashed = {**_ADS_SPEC, "columns": [{**c, "hash_buckets": 5} if c["name"] == "history" else c for c in _ADS_SPEC["columns"]]}
    out, schema = _run(tmp_path, hashed, out="hashed", input=str(tmp_path / "raw" / "day_*.parquet"))
    assert schema.cardinality("history") == 5 + 2 and not (out / "vocab" / "history.parquet").exists()
    assert [g["history"] for g in _table(out, "test").to_pylist()] == [
        [MISSING_ID + 1 + _hash_reference(t.encode()) % 5 for t in r["history"][:3]] for r in want[TEST]]


def test_time_split_on_a_parquet_timestamp_column(tmp_path):
    rng = np.random.default_rng(6)
    start = np.datetime64("2026-01-01T00:00:00", "ms")
    times = [start + np.timedelta64(int(m), "m") for m in rng.integers(0, 4 * 24 * 60, 300)]
    times[5] = None
    pq.write_table(pa.table({"click": rng.integers(0, 2, 300), "user": rng.integers(0, 9, 300),
                             "ts": pa.array(times, pa.timestamp("ms"))}), tmp_path / "t.parquet")  # fmt: skip
    spec = {"name": "ts", "input": {"format": "parquet"},
            "columns": [{"name": "click", "type": "label"}, {"name": "user", "type": "categorical"}, {"name": "ts", "type": "ignore"}],
            "split": {"kind": "time", "time": {"column": "ts", "train_before": "2026-01-03", "val_before": "2026-01-03T12:00"}}}  # fmt: skip
    with pytest.raises(UserError, match=r"t\.parquet:row group 0:row 5: time column ts is empty"):
        _run(tmp_path, spec, input=str(tmp_path / "t.parquet"))
    _, schema = _run(tmp_path, spec, out="o2", input=str(tmp_path / "t.parquet"), on_bad_rows="skip")
    kept = [t for t in times if t is not None]
    cut, val = np.datetime64("2026-01-03"), np.datetime64("2026-01-03T12:00")
    assert schema.recipe["rows"] == {"train": sum(t < cut for t in kept), "val": sum(cut <= t < val for t in kept),
                                     "test": sum(t >= val for t in kept)}  # fmt: skip
    assert min(schema.recipe["rows"].values()) > 20 and schema.recipe["bad_rows"]["count"] == 1


def test_files_split_spreads_a_file_listed_twice_by_the_ratios(tmp_path):
    rng = np.random.default_rng(5)
    for d in range(3):
        rows = [[str(rng.integers(0, 2)), f"a{rng.integers(0, 4)}", str(d)] for _ in range(200)]
        (tmp_path / f"day_{d}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    spec = {
        "name": "days",
        "input": {"format": "tsv", "paths": [str(tmp_path / "day_*.tsv")]},
        "columns": [{"name": "click", "type": "label"}, {"name": "a", "type": "categorical"},
                    {"name": "day", "type": "categorical"}],
        "split": {"kind": "files", "ratios": [8, 1, 3], "seed": 7,
                  "files": {"train": ["day_[01].tsv"], "val": ["day_2.tsv"], "test": ["day_2.tsv"]}},
    }  # fmt: skip
    out, schema = _run(tmp_path, spec)
    day2 = assign_splits(file_key(2, np.arange(200)), (0.0, 0.25, 0.75), 7)
    assert schema.splits["train"].rows == 400 and (day2 == TRAIN).sum() == 0
    assert schema.splits["val"].rows == (day2 == VAL).sum() > 20 and schema.splits["test"].rows == (day2 == TEST).sum()
    days = read_schema(str(out))
    assert days.cardinality("day") == 2 + 2  # only days 0 and 1 are train tokens: day 2 is OOV everywhere
    assert set(_table(out, "test")["day"].to_pylist()) == {OOV_ID}
    spec["split"]["files"]["train"] = ["day_0.tsv"]
    with pytest.raises(UserError, match=r"day_1\.tsv matches no glob of split\.files"):
        _run(tmp_path, spec, out="out2")


def test_several_random_split_files_and_workers_write_the_same_bytes(tmp_path):
    """Two input files (--input twice): one process, and two workers (threads here) meeting in a work dir."""
    rows = _csv_rows(160, seed=1)
    for k, part in enumerate((rows[:90], rows[90:])):
        _write_csv(tmp_path / f"p{k}.csv", part)
    inputs = [str(tmp_path / "p0.csv"), str(tmp_path / "p1.csv")]
    out, schema = _run(tmp_path, _CSV_SPEC, out="one", input=inputs)
    keys = np.concatenate([file_key(0, np.arange(90)), file_key(1, np.arange(70))])
    assert schema.splits["val"].rows == (assign_splits(keys, (0.8, 0.1, 0.1), 0) == VAL).sum()
    config = PreprocessConfig(output=str(tmp_path / "two"), spec=str(tmp_path / "spec.yaml"), input=inputs, progress=False)
    errors = []

    def worker(i: int) -> None:
        try:
            run_worker(config, i, 2, str(tmp_path / "work"), timeout_s=60)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_two_workers_as_one_torchx_local_cwd_job(tmp_path):
    """``pipelines/components.py:preprocess --workers 2``: two replicas, the bytes of one process."""
    _ads_parquet(tmp_path / "raw", days=4)
    spec = _spec_file(tmp_path, {**_ADS_SPEC, "split": {"kind": "random"}})
    one = preprocess(PreprocessConfig(output=str(tmp_path / "one"), spec=spec, input=str(tmp_path / "raw" / "*.parquet"), progress=False))
    env = {"PATH": f"{Path(PYTHON).parent}:/usr/bin:/bin"}
    done = subprocess.run(
        [str(Path(PYTHON).parent / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
         "pipelines/components.py:preprocess", "--spec", spec, "--input", str(tmp_path / "raw" / "*.parquet"),
         "--output", str(tmp_path / "two"), "--workers", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout + done.stderr, done.stderr[-3000:]
    assert len({p.parent.name for p in (tmp_path / "logs").rglob("combined.log")}) == 2  # two replicas ran
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) > 5 and one.splits["train"].rows > 0
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


# --- bad rows, unknown columns, spec errors -------------------------------------------------------


def test_bad_rows_name_file_line_and_parquet_row_group_row(tmp_path):
    rows = _csv_rows(40)
    rows[30]["cnt"] = "x7"
    _write_csv(tmp_path / "x.csv", rows)
    with pytest.raises(UserError, match=r"x\.csv:32: cnt 'x7' is not an integer"):  # data row 31 + the header
        _run(tmp_path, _CSV_SPEC, input=str(tmp_path / "x.csv"))
    _ads_parquet(tmp_path / "raw", days=1)
    table = pq.read_table(tmp_path / "raw" / "day_0.parquet")
    labels = table["click"].to_pylist()
    labels[73] = 5
    pq.write_table(table.set_column(0, "click", pa.array(labels, pa.int64())), tmp_path / "raw" / "day_0.parquet", row_group_size=50)
    with pytest.raises(UserError, match=r"day_0\.parquet:row group 1:row 23: label 5 is not 0 or 1"):
        _run(tmp_path, _ADS_SPEC, out="o2", input=str(tmp_path / "raw" / "day_0.parquet"))
    spec = {**_ADS_SPEC, "columns": [*_ADS_SPEC["columns"], {"name": "age", "type": "categorical"}]}
    with pytest.raises(UserError, match=r"no column\(s\) \['age'\]; the file's columns are \['click', 'user', 'history', 'price', 'hour'\]"):
        _run(tmp_path, spec, out="o3", input=str(tmp_path / "raw" / "day_0.parquet"))
    pq.write_table(table.set_column(2, "history", pa.array(np.zeros(table.num_rows))), tmp_path / "raw" / "flat.parquet")
    with pytest.raises(UserError, match=r"flat\.parquet: column history is double; a multi_hot column needs a list column"):
        _run(tmp_path, _ADS_SPEC, out="o4", input=str(tmp_path / "raw" / "flat.parquet"))
    (tmp_path / "raw" / "text.parquet").write_text("click,user\n1,2\n")
    with pytest.raises(UserError, match=r"text\.parquet: not a readable Parquet file"):
        _run(tmp_path, _ADS_SPEC, out="o5", input=str(tmp_path / "raw" / "text.parquet"))


_BASE = {"name": "t", "input": {"format": "csv", "header": True},
         "columns": [{"name": "y", "type": "label"}, {"name": "a", "type": "categorical"}]}  # fmt: skip


def _with(path: str, value: object) -> object:
    """_BASE with the value at a dotted key path replaced (path "": the whole spec is ``value``)."""
    if not path:
        return value
    spec = yaml.safe_load(yaml.safe_dump(_BASE))
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return spec


@pytest.mark.parametrize("path, value, message", [
    ("input.format", "xls", r"input\.format: 'xls' is not one of \['csv', 'tsv', 'parquet'\]"),
    ("input.colour", 1, r"input: unknown key\(s\) \['colour'\]; valid keys are \['delimiter', 'format', 'header', 'paths', 'quoted'\]"),
    ("columns.1.type", "text", r"columns\[1\]\.type: 'text' is not one of \['label', 'categorical', 'multi_hot', 'numeric', 'ignore'\]"),
    ("columns.1", {"name": "a", "type": "categorical", "separator": "|"},
     r"columns\[1\] \(a, categorical\): key\(s\) \['separator'\] do not apply to a categorical column; it takes \['hash_buckets', 'min_count', 'name', 'type'\]"),
    ("columns.1", {"name": "a", "type": "multi_hot", "max_length": 4, "pooling": "max", "separator": "|"},
     r"columns\[1\]\.pooling: 'max' is not one of \['sum', 'mean'\]"),
    ("columns.1", {"name": "a", "type": "multi_hot", "max_length": 4}, r"columns\[1\]\.separator: a multi_hot column of a csv file needs a separator"),
    ("columns.1", {"name": "a", "type": "multi_hot", "max_length": 1, "separator": "|"}, r"columns\[1\]\.max_length: .*>= 2"),
    ("columns.1", {"name": "a", "type": "categorical", "min_count": 0}, r"columns\[1\]\.min_count: must be >= 1"),
    ("columns.1", {"name": "a", "type": "categorical", "min_count": 2, "hash_buckets": 9}, r"columns\[1\]: set min_count or hash_buckets, not both"),
    ("columns.1", {"name": "a", "type": "numeric"}, r"columns\[1\]: a numeric column needs token \(criteo_log \| buckets\) and/or dense \(log1p \| identity\)"),
    ("columns.1", {"name": "a", "type": "numeric", "token": "buckets"}, r"columns\[1\]\.boundaries: set exactly when token is buckets"),
    ("columns.1", {"name": "a", "type": "numeric", "token": "buckets", "boundaries": [3, 1]}, r"columns\[1\]\.boundaries: must be strictly increasing"),
    ("columns.1", {"name": "a", "type": "numeric", "token": "log"}, r"columns\[1\]\.token: 'log' is not one of \['criteo_log', 'buckets'\]"),
    ("columns.1", {"name": "y", "type": "categorical"}, r"columns: names \['y'\] appear more than once"),
    ("columns.1", {"name": "a", "type": "label"}, r"exactly one column must have type label, found 2"),
    ("columns.1", {"name": "a", "type": "ignore"}, r"columns: no sparse field"),
    ("columns.1", {"name": "dense", "type": "categorical"}, r"columns\[1\]\.name: 'dense' is reserved"),
    ("split.kind", "hash", r"split\.kind: 'hash' is not one of \['random', 'time', 'files'\]"),
    ("split.ratios", [1, 1], r"split\.ratios: three non-negative numbers"),
    ("split", {"kind": "time"}, r"split\.time: kind time needs \{column, train_before, val_before\}"),
    ("split", {"kind": "time", "time": {"column": "when", "train_before": 1, "val_before": 2}},
     r"split\.time\.column: 'when' is not a column; columns are \['y', 'a'\]"),
    ("split", {"kind": "time", "time": {"column": "a", "train_before": 5, "val_before": 2}}, r"split\.time: train_before 5 is after val_before 2"),
    ("split", {"kind": "files"}, r"split\.files: kind files needs"),
    ("split", {"kind": "files", "files": {"train": ["x"], "holdout": ["y"]}}, r"split\.files: unknown split\(s\) \['holdout'\]; allowed: \['train', 'val', 'test'\]"),
    ("split", {"kind": "random", "files": {"train": ["x"]}}, r"split\.files: only with kind files"),
    ("defaults.min_count", 0, r"defaults\.min_count: must be >= 1"),
    ("columns.1", {"name": "a", "type": "multi_hot", "max_length": 4, "separator": ","}, r"columns\[1\]\.separator: ',' is the file's delimiter"),
    ("columns.1", {"name": "a", "type": "numeric", "dense": "log1p", "min_count": 2}, r"columns\[1\]\.min_count: only for a numeric column with a token"),
    ("input.format", "parquet", r"input: header and delimiter are for csv/tsv, not parquet"),
    ("input", {"format": "parquet", "delimiter": ";"}, r"input: header and delimiter are for csv/tsv, not parquet"),
    ("input.delimiter", "||", r"input\.delimiter: one character, got '\|\|'"),
    ("split.ratios", [0, 1, 1], r"split\.ratios: the train part must be positive, got \[0\.0, 1\.0, 1\.0\]"),
    ("", {**_BASE, "columns": [_BASE["columns"][0], {"name": "a", "type": "multi_hot", "max_length": 3, "separator": "|"}],
          "split": {"kind": "time", "time": {"column": "a", "train_before": 1, "val_before": 2}}},
     r"split\.time\.column: 'a' is multi_hot; the time column is a label, categorical, numeric or ignore column"),
    ("split", {"kind": "time", "time": {"column": "a", "train_before": [1], "val_before": 2}},
     r"split\.time: train_before and val_before are numbers or ISO timestamps"),
    ("split", {"kind": "time", "time": {"column": "a", "train_before": 1, "val_before": "2026-01-02"}},
     r"split\.time: train_before and val_before must both be numbers or both text"),
    ("split", {"time": {"column": "a", "train_before": 1, "val_before": 2}}, r"split\.time: only with kind time \(kind is random\)"),
    ("split", {"kind": "files", "files": {"train": [], "val": ["x"]}}, r"split\.files\.train: no globs; train needs files"),
    ("columns.1", "a", r"columns\[1\]: expected a mapping like \{name: C1, type: categorical\}, got 'a'"),
    ("", ["name", "t"], r"expected a mapping with keys name, input, columns"),
])  # fmt: skip
def test_spec_errors_name_the_key_path_and_the_allowed_values(path, value, message):
    with pytest.raises(UserError, match=r"^spec\.yaml: (.*)?" + message):
        spec_from_dict(_with(path, value), "spec.yaml")


def test_spec_file_and_cli_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        preprocess(PreprocessConfig(output=str(tmp_path / "o"), spec=str(tmp_path / "bad.yaml")))
    with pytest.raises(UserError, match=r"unknown dataset 'kaggle'; shipped specs: \[.*'avazu'.*'criteo'"):
        preprocess(PreprocessConfig(output=str(tmp_path / "o"), dataset="kaggle"))
    with pytest.raises(UserError, match=r"names no input\.paths; pass --input"):
        _run(tmp_path, _BASE)
    with pytest.raises(UserError, match=r"input .*nothing-\*\.csv: no file matches"):
        _run(tmp_path, _BASE, input=str(tmp_path / "nothing-*.csv"))
    assert not list(tmp_path.glob("o*"))


def test_a_failing_worker_stops_the_others_with_its_message(tmp_path):
    rows = _csv_rows(60, seed=2)
    rows[50]["click"] = "7"
    _write_csv(tmp_path / "p0.csv", rows[:30])
    _write_csv(tmp_path / "p1.csv", rows[30:])
    config = PreprocessConfig(output=str(tmp_path / "out"), spec=_spec_file(tmp_path, _CSV_SPEC),
                              input=[str(tmp_path / "p0.csv"), str(tmp_path / "p1.csv")], progress=False)  # fmt: skip
    with pytest.raises(UserError, match=r"p1\.csv:22: label '7' is not 0 or 1"):
        run_worker(config, 1, 2, str(tmp_path / "work"), timeout_s=60)
    with pytest.raises(UserError, match=r"worker 1 failed: .*p1\.csv:22: label '7' is not 0 or 1"):
        run_worker(config, 0, 2, str(tmp_path / "work"), timeout_s=60)
    assert not (tmp_path / "out").exists()


def test_preprocess_component_runs_one_replica_per_worker_and_version_1_schemas_still_read(tmp_path):
    from pipelines import components

    role = components.preprocess(output="out", spec="s.yaml", input="raw/*.parquet", workers=3).roles[0]
    assert role.num_replicas == 3
    assert role.args[role.args.index("--worker") + 1] == "${replica_id}" and "--spec" in role.args
    assert components.preprocess(output="out").roles[0].num_replicas == 1
    from trainer.data.schema import DatasetSchema

    v1 = {"dataset": "criteo", "sparse_fields": [{"name": "C1", "cardinality": 5}], "dense_fields": [],
          "splits": {"train": {"rows": 3, "files": ["train/part-00000.parquet"]}}, "version": 1}  # fmt: skip
    field = DatasetSchema.from_dict(v1).sparse_fields[0]
    assert (field.max_length, field.pooling, field.multi_hot) == (1, "sum", False)
    with pytest.raises(UserError, match=r"schema version 3, this code reads \[1, 2\]"):
        DatasetSchema.from_dict({**v1, "version": 3})


def test_time_split_on_iso_text_with_rows_missing_their_time(tmp_path):
    rng = np.random.default_rng(9)
    times = [f"2026-01-0{d}T{h:02d}" for d, h in zip(rng.integers(1, 6, 200), rng.integers(0, 24, 200))]
    times[17] = ""
    (tmp_path / "t.csv").write_text("y,a,ts\n" + "".join(f"{rng.integers(0, 2)},a{i % 3},{t}\n" for i, t in enumerate(times)))
    spec = {**_BASE, "columns": [*_BASE["columns"], {"name": "ts", "type": "ignore"}],
            "split": {"kind": "time", "time": {"column": "ts", "train_before": "2026-01-04", "val_before": "2026-01-05T00"}}}  # fmt: skip
    with pytest.raises(UserError, match=r"t\.csv:19: time column ts is empty"):
        _run(tmp_path, spec, input=str(tmp_path / "t.csv"))
    _, schema = _run(tmp_path, spec, out="o2", input=str(tmp_path / "t.csv"), on_bad_rows="skip")
    kept = [t for t in times if t]
    assert schema.recipe["rows"] == {"train": sum(t < "2026-01-04" for t in kept),
                                     "val": sum("2026-01-04" <= t < "2026-01-05T00" for t in kept),
                                     "test": sum(t >= "2026-01-05T00" for t in kept)}  # fmt: skip
    assert schema.recipe["bad_rows"]["count"] == 1 and schema.recipe["split"] == "time"
