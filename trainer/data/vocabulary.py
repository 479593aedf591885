"""Field vocabularies: train token counts, the min-count cut, ``vocab/FIELD.parquet``, token -> id lookup.

A vocabulary is a table (token: binary, id: int32, count: int64) of the tokens
kept, ids from ``MISSING_ID + 1``; a token it lacks maps to ``OOV_ID``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.schema import MISSING_ID, OOV_ID
from trainer.errors import UserError
from trainer.storage import filesystem, join


class TokenCounts:
    """Running train counts of one field's tokens, merged by hash group-by as they grow."""

    def __init__(self) -> None:
        self._tables: list[pa.Table] = []
        self._pending = 0  # rows added since the last merge
        self._merged = 0  # rows after the last merge

    def add(self, tokens: pa.Array, counts: np.ndarray) -> None:
        self._tables.append(pa.table({"token": tokens, "count": pa.array(counts, pa.int64())}))
        self._pending += len(tokens)
        if self._pending > max(self._merged, 1 << 18):  # doubling: merging costs O(distinct tokens) amortised
            self._merge()

    def _merge(self) -> None:
        if not self._tables:
            self._tables = [pa.table({"token": pa.array([], pa.binary()), "count": pa.array([], pa.int64())})]
        merged = pa.concat_tables(self._tables).group_by("token").aggregate([("count", "sum")])
        self._tables = [pa.table({"token": merged["token"], "count": merged["count_sum"]})]
        self._merged, self._pending = merged.num_rows, 0

    def table(self) -> pa.Table:
        """(token, count) of every token seen, in no particular order."""
        self._merge()
        return self._tables[0]


def build_vocabulary(counts: pa.Table, min_count: int) -> pa.Table:
    """Tokens with train count >= min_count; ids from 2 by descending count, ties by token."""
    kept = counts.filter(pc.greater_equal(counts["count"], min_count))
    kept = kept.sort_by([("count", "descending"), ("token", "ascending")])
    first = MISSING_ID + 1
    ids = pa.array(np.arange(first, first + kept.num_rows, dtype=np.int32))
    return pa.table({"token": kept["token"], "id": ids, "count": kept["count"]})


def entry_ids(column: pa.DictionaryArray, tokens: pa.Array, ids: pa.Array) -> np.ndarray:
    """The id of each dictionary entry of ``column`` given a vocabulary's (tokens, ids): int32 (len(dictionary),).

    A null entry (the missing value) gets ``MISSING_ID``, a token not in ``tokens`` ``OOV_ID``.
    """
    dictionary = column.dictionary
    known = ids.take(pc.index_in(dictionary, value_set=tokens)).fill_null(OOV_ID)
    return pc.if_else(dictionary.is_null(), pa.scalar(MISSING_ID, pa.int32()), known).to_numpy()


def write_vocabulary(root: str, name: str, vocabulary: pa.Table, where: str) -> None:
    """``vocab/NAME.parquet``: token (text), id, count."""
    try:
        vocabulary = vocabulary.set_column(0, "token", vocabulary["token"].cast(pa.string()))
    except pa.ArrowInvalid:
        raise UserError(f"{where}: field {name} has frequent values that are not UTF-8 text") from None
    fs, path = filesystem(join(root, "vocab", f"{name}.parquet"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(vocabulary, f, compression="zstd")
