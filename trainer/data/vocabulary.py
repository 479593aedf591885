"""Field vocabularies: train token counts, the min-count cut, ``vocab/FIELD.parquet``, token -> id lookup.

A vocabulary is a table (token: binary, id: int32, count: int64) of the tokens
kept, ids from ``MISSING_ID + 1``; a token it lacks maps to ``OOV_ID``
(``VocabularyLookup``, built once per vocabulary).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data.hashing import hash_tokens
from trainer.data.schema import MISSING_ID, OOV_ID
from trainer.errors import UserError
from trainer.storage import filesystem, join

_HASH_SLICE = 1 << 16  # vocabulary tokens hashed at a time (hashing pads each slice to its longest token)
_SET_RATIO = 2  # below about 2-3 vocabulary tokens per dictionary entry a per-chunk set is the faster (bench_vocabulary)


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


class VocabularyLookup:
    """A vocabulary's token -> id lookup, built once and reused for every chunk.

    The tokens are sorted by their 64-bit hash (``trainer.data.hashing``); a
    lookup hashes the chunk's dictionary, binary-searches the hashes and checks
    the candidate's bytes, so its cost grows with the dictionary, not with the
    vocabulary. A vocabulary no larger than ``_SET_RATIO`` times the dictionary
    is cheaper as a hash set built for the chunk; vocabulary tokens that share a
    64-bit hash are looked up that way too, among themselves.
    """

    def __init__(self, vocabulary: pa.Table) -> None:
        self._tokens = vocabulary["token"].combine_chunks().cast(pa.binary())
        self._ids = vocabulary["id"].combine_chunks()
        hashes = np.concatenate(
            [hash_tokens(self._tokens.slice(i, _HASH_SLICE)) for i in range(0, len(self._tokens), _HASH_SLICE)]
            or [np.zeros(0, np.uint64)]
        )
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]
        shared = self._hashes[1:] == self._hashes[:-1]
        self._shared = np.zeros(len(hashes), dtype=bool)  # by hash rank: another token has this hash
        self._shared[1:] |= shared
        self._shared[:-1] |= shared
        kept = pa.array(self._order[self._shared])
        self._shared_tokens, self._shared_ids = self._tokens.take(kept), self._ids.take(kept)

    def entry_ids(self, column: pa.DictionaryArray) -> np.ndarray:
        """The id of each dictionary entry of ``column``: int32 (len(dictionary),).

        A null entry (the missing value) gets ``MISSING_ID``, a token not in the vocabulary ``OOV_ID``.
        """
        dictionary = column.dictionary.cast(pa.binary())
        values = dictionary.fill_null(b"")
        if len(self._tokens) <= _SET_RATIO * len(values):
            out = _set_ids(values, self._tokens, self._ids)
        else:
            out = self._hashed_ids(values)
        out[dictionary.is_null().to_numpy(zero_copy_only=False)] = MISSING_ID
        return out

    def _hashed_ids(self, values: pa.Array) -> np.ndarray:
        hashes = hash_tokens(values)
        by_hash = np.argsort(hashes)  # sorted keys make the binary search cache-friendly
        rank = np.empty(len(values), dtype=np.int64)
        rank[by_hash] = np.minimum(np.searchsorted(self._hashes, hashes[by_hash]), len(self._hashes) - 1)
        candidate = self._order[rank]
        same_hash = self._hashes[rank] == hashes
        same_bytes = pc.equal(self._tokens.take(pa.array(candidate)), values).to_numpy(zero_copy_only=False)
        out = np.where(same_hash & same_bytes, self._ids.to_numpy()[candidate], OOV_ID).astype(np.int32)
        shared = same_hash & self._shared[rank]
        if shared.any():
            out[shared] = _set_ids(values.filter(pa.array(shared)), self._shared_tokens, self._shared_ids)
        return out


def _set_ids(values: pa.Array, tokens: pa.Array, ids: pa.Array) -> np.ndarray:
    """The id of each of ``values`` by a hash set of ``tokens`` built for this call (``OOV_ID`` if absent): int32."""
    return ids.take(pc.index_in(values, value_set=tokens)).fill_null(OOV_ID).to_numpy().astype(np.int32)


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
