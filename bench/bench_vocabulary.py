"""Vocabulary lookups as vocabularies grow: seconds per chunk lookup, and preprocessing a field of millions of tokens.

``python -m bench.bench_vocabulary [--tokens 100000,1000000,5000000] [--rows 7000000]``:

- ``lookup``: per vocabulary size (Criteo-like 8-hex-digit tokens), the build
  of a ``VocabularyLookup`` (once per input file and field) and one pass-2
  chunk (131,072 rows, the preprocessor's chunk: 80% known tokens drawn
  uniformly, as in the largest Criteo fields, 20% unknown ones) looked up:
  seconds per lookup and that field's rows/s, beside a set built again for
  each lookup (``pyarrow.compute.index_in``, the former code);
- ``preprocess`` (``--rows`` > 0): a TSV of a label and one token per row,
  about 95% of them distinct, through a spec with ``min_count: 1``: the
  field's vocabulary holds the train split's 5.4M tokens at 7M rows. Rows/s
  end to end and peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe
from trainer.cli_help import HelpFormatter, description

CHUNK_ROWS = 1 << 17  # trainer.data.preprocess's chunk_rows

_RUN = """
import json, resource, sys, time
from trainer.data.preprocess import PreprocessConfig, preprocess
raw, out, spec = sys.argv[1:4]
wall = time.perf_counter()
schema = preprocess(PreprocessConfig(output=out, input=raw, spec=spec, progress=False))
print(json.dumps({"wall_s": time.perf_counter() - wall, "rows": schema.recipe["rows_read"],
                  "tokens": schema.sparse_fields[0].cardinality - 2,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _tokens(values):
    import pyarrow as pa

    return pa.array([b"%08x" % v for v in values.tolist()], pa.binary())


def lookup_case(tokens: int, repeats: int = 3) -> dict[str, float]:
    """Build and per-chunk lookup seconds of a ``tokens``-token vocabulary, new lookup and per-chunk set."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from trainer.data.schema import OOV_ID
    from trainer.data.vocabulary import VocabularyLookup, build_vocabulary

    rng = np.random.default_rng(0)
    values = np.unique(rng.integers(0, 1 << 32, int(tokens * 1.1)))[:tokens]
    rng.shuffle(values)
    counts = pa.table({"token": _tokens(values), "count": pa.array(rng.zipf(1.5, tokens), pa.int64())})
    vocabulary = build_vocabulary(counts, 1)
    known = vocabulary["token"].combine_chunks().take(pa.array(rng.integers(0, tokens, CHUNK_ROWS)))
    unknown = _tokens(rng.integers(1 << 33, 1 << 34, CHUNK_ROWS))
    chunk = pa.array(np.where(rng.random(CHUNK_ROWS) < 0.8, known.to_numpy(False), unknown.to_numpy(False)), pa.binary())
    column = pa.concat_arrays([chunk, pa.nulls(1, pa.binary())]).dictionary_encode(null_encoding="encode")
    start = time.perf_counter()
    lookup = VocabularyLookup(vocabulary)
    build_s = time.perf_counter() - start
    new, old = [], []
    tokens_, ids = vocabulary["token"].combine_chunks(), vocabulary["id"].combine_chunks()
    for _ in range(repeats):
        start = time.perf_counter()
        ours = lookup.entry_ids(column)
        new.append(time.perf_counter() - start)
        start = time.perf_counter()
        former = ids.take(pc.index_in(column.dictionary, value_set=tokens_)).fill_null(OOV_ID).to_numpy()
        old.append(time.perf_counter() - start)
        assert (ours[:-1] == former[:-1]).all()  # the same ids (the last entry: the missing value)
    return {"build_s": build_s, "lookup_s": min(new), "set_s": min(old), "entries": len(column.dictionary)}


def preprocess_case(rows: int, tmp: Path) -> dict[str, float]:
    """One field of ~0.9 x rows distinct tokens through the preprocessor, in a fresh process."""
    import numpy as np
    import yaml

    rng = np.random.default_rng(1)
    raw, spec = tmp / "raw.tsv", tmp / "spec.yaml"
    with raw.open("w") as f:
        for start in range(0, rows, 1 << 20):
            n = min(1 << 20, rows - start)
            ids = rng.integers(0, rows * 10, n)
            f.write("".join(f"{y}\t{t:08x}\n" for y, t in zip(rng.integers(0, 2, n).tolist(), ids.tolist())))
    spec.write_text(yaml.safe_dump({
        "name": "vocab_bench", "input": {"format": "tsv", "quoted": False},
        "columns": [{"name": "label", "type": "label"}, {"name": "C1", "type": "categorical", "min_count": 1}],
    }))  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _RUN, str(raw), str(tmp / "out"), str(spec)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"preprocess failed on {rows} rows:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--tokens", default="100000,1000000,5000000", help="comma-separated vocabulary sizes")
    p.add_argument("--rows", type=int, default=7_000_000, help="rows of the preprocess case (0: skip it)")
    args = p.parse_args()
    print(f"machine: {describe()}")
    print(f"{'tokens':>10} {'build s':>8} {'entries':>8} {'lookup s':>9} {'rows/s':>12} {'set s':>7} {'set rows/s':>10}")
    for n in [int(t) for t in args.tokens.split(",")]:
        r = lookup_case(n)
        print(f"{n:>10,} {r['build_s']:>8.2f} {r['entries']:>8,} {r['lookup_s']:>9.4f} {CHUNK_ROWS / r['lookup_s']:>12,.0f} "
              f"{r['set_s']:>7.3f} {CHUNK_ROWS / r['set_s']:>10,.0f}", flush=True)  # fmt: skip
    if args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-vocabulary-") as tmp:
            r = preprocess_case(args.rows, Path(tmp))
        print(f"preprocess: {r['rows']:,} rows, one field of {r['tokens']:,} tokens: {r['wall_s']:.1f} s, "
              f"{r['rows'] / r['wall_s']:,.0f} rows/s, peak {r['peak_rss_mib']:,.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
