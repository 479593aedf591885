"""Collapse metrics of embedding sets, all from one Gram per field.

Information abundance (the paper's IA) of a matrix E with singular values s is
``sum(s) / max(s)``: 1 for a rank-1 table, K for a K-column table whose singular values
are all equal. The singular values come from the Gram, ``s = sqrt(eig(E^T E))`` (float64;
the tiny negative eigenvalues of a rank-deficient Gram are clamped to 0).

Set diversity: the cosines of the principal angles between the column spaces of sets i
and j are the singular values of ``Q_i^T Q_j`` for orthonormal bases Q. With
``Q_i = E_i W_i`` for a whitening ``W_i`` of ``G_ii`` (``W_i^T G_ii W_i = I``),
``Q_i^T Q_j = W_i^T G_ij W_j``: the Gram's blocks are enough. ``W_i = R_i^-1`` (Cholesky
``G_ii = R_i^T R_i``) is one whitening; this module uses the eigendecomposition
``G_ii = V diag(l) V^T`` and ``W_i = V_r diag(l_r^-1/2)`` over the eigenvalues above
``rtol^2 * max(l)`` instead, which is the same for a full-rank set (the singular values
do not depend on which orthonormal basis is used) and stays well-defined for a
rank-deficient one (a table with fewer rows than columns, or a collapsed one): its column
space then has dimension r < K, and the pair has ``min(r_i, r_j)`` principal angles.
Similarity = mean cosine, diversity = 1 - similarity (0 for identical column spaces, 1
for orthogonal ones).

The baseline of every IA is the IA of a random table of the same shape drawn as the
model initialises its tables (``trainer.collapse.gram.random_gram``, exact and cached per
shape); normalised IA = IA / baseline IA. Diversity has the same baseline: the diversity of
the same column groups of that random table (``random_mean_diversity``), and normalised
diversity = diversity / baseline diversity. Both baselines share the table's shape, so a
table with fewer ids than columns is compared with a random table capped the same way;
``FieldCollapse.*_rank_bound`` say where that cap, not training, sets the figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from typing import Any, Sequence

import numpy as np

from trainer.collapse.gram import DEFAULT_CHUNK_ROWS, FieldGram, field_gram, random_gram

# Singular values below RTOL * max (eigenvalues of a set's Gram below RTOL^2 * max) span no
# direction for diversity: well above float32 storage noise (~1e-7 * sqrt(K)) and float64
# eigensolver noise (~1e-8) of the singular values, well below anything a trained table
# uses. (IA needs no threshold: noise-level singular values add ~1e-7 each to it.)
DEFAULT_RTOL = 1e-5


# ---- spectra and information abundance ----------------------------------------------------


def singular_values_from_gram(gram: np.ndarray) -> np.ndarray:
    """The singular values of E from ``G = E^T E``, largest first (float64)."""
    g = np.asarray(gram, dtype=np.float64)
    g = (g + g.T) / 2
    eig = np.linalg.eigvalsh(g)
    return np.sqrt(np.clip(eig, 0.0, None))[::-1].copy()


def ia_of_singular_values(s: Sequence[float] | np.ndarray) -> float:
    """``sum(s) / max(s)``; NaN for an all-zero matrix (no direction at all)."""
    s = np.asarray(s, dtype=np.float64)
    top = float(s.max()) if s.size else 0.0
    return float(s.sum() / top) if top > 0 else math.nan


def information_abundance_from_gram(gram: np.ndarray) -> float:
    return ia_of_singular_values(singular_values_from_gram(gram))


def singular_values(matrix: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """The singular values of a (rows, K) matrix (tensor, array, memmap), largest first,
    through the streaming float64 Gram."""
    return singular_values_from_gram(field_gram([matrix], chunk_rows=chunk_rows).gram)


def information_abundance(matrix: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """IA = sum(s) / max(s) of a (rows, K) matrix (tensor, array, memmap), streamed."""
    return ia_of_singular_values(singular_values(matrix, chunk_rows))


def random_baseline_ia(rows: int, cols: int, seed: int = 0) -> float:
    """IA of the seeded random-initialised ``rows x cols`` table (exact, cached per shape)."""
    return information_abundance_from_gram(random_gram(rows, cols, seed))


# ---- principal angles and set diversity --------------------------------------------------


def whitening(gram_block: np.ndarray, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """W (K x r) with ``W^T G W = I_r`` over the directions of ``G`` whose singular value is
    above ``rtol`` times the largest (r = 0 for an all-zero block)."""
    g = np.asarray(gram_block, dtype=np.float64)
    eig, vecs = np.linalg.eigh((g + g.T) / 2)
    top = eig.max() if eig.size else 0.0
    if not top > 0:
        return np.zeros((g.shape[0], 0))
    keep = eig > (rtol * rtol) * top
    return vecs[:, keep] / np.sqrt(eig[keep])


def principal_cosines(gram: np.ndarray, a: slice, b: slice, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of the column groups
    ``a`` and ``b`` of the matrix whose Gram is ``gram``, largest first, in [0, 1]."""
    g = np.asarray(gram, dtype=np.float64)
    wa, wb = whitening(g[a, a], rtol), whitening(g[b, b], rtol)
    if wa.shape[1] == 0 or wb.shape[1] == 0:
        return np.zeros(0)
    cos = np.linalg.svd(wa.T @ g[a, b] @ wb, compute_uv=False)
    return np.clip(cos, 0.0, 1.0)


@dataclass
class SetPair:
    """Two embedding sets (or column groups) of one field and how alike their column spaces are."""

    i: int
    j: int
    similarity: float  # mean cosine of the principal angles
    diversity: float  # 1 - similarity
    cosines: list[float]


def set_pairs(gram: np.ndarray, groups: Sequence[slice], rtol: float = DEFAULT_RTOL) -> list[SetPair]:
    """Similarity and diversity of every pair of column groups (i < j)."""
    pairs = []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            cos = principal_cosines(gram, groups[i], groups[j], rtol)
            sim = float(cos.mean()) if cos.size else math.nan
            pairs.append(SetPair(i, j, sim, 1.0 - sim, [float(c) for c in cos]))
    return pairs


def set_diversity(matrices: Sequence[Any], dim: int | None = None, rtol: float = DEFAULT_RTOL) -> list[SetPair]:
    """Pairwise diversity of a field's sets given as matrices (streams one Gram)."""
    g = field_gram(list(matrices), dim)
    k = g.dim
    return set_pairs(g.gram, [slice(m * k, (m + 1) * k) for m in range(g.num_sets)], rtol)


# ---- one field --------------------------------------------------------------------------


@dataclass
class FieldCollapse:
    """Every collapse metric of one field (all from its Gram).

    ``set_*``: each of the M sets (rows x K); ``overall_*``: the M sets concatenated
    (rows x M*K, the paper's overall embedding of a multi-embedding model; for a single
    set the same as the set). ``*_random_*``: the seeded random-initialised table of the
    same shape. ``diversity_groups``: what the pairs compare: ``"sets"`` (M > 1),
    ``"column_groups"`` (a single-embedding table split into column groups, as the paper
    does to compare SE with ME), or ``"none"``.
    """

    field: str
    rows: int
    num_sets: int
    dim: int
    set_ia: list[float]
    set_ia_normalized: list[float]
    set_random_ia: float
    set_spectra: list[list[float]]
    set_random_spectrum: list[float]
    overall_ia: float | None
    overall_ia_normalized: float | None
    overall_random_ia: float
    overall_spectrum: list[float] | None
    overall_random_spectrum: list[float]
    diversity_groups: str = "none"
    pairs: list[SetPair] = dc_field(default_factory=list)
    mean_diversity: float | None = None
    random_mean_diversity: float | None = None

    @property
    def mean_set_ia(self) -> float:
        return _mean(self.set_ia)

    @property
    def mean_set_ia_normalized(self) -> float:
        return _mean(self.set_ia_normalized)

    # ---- against the random table of the same shape, and where the id count caps the rank

    @property
    def diversity_group_width(self) -> int | None:
        """Columns of each compared group: a set's ``dim``, or ``dim / groups`` for column
        groups (G groups make G(G-1)/2 pairs); None without pairs."""
        if self.diversity_groups == "sets":
            return self.dim
        if self.diversity_groups == "column_groups" and self.pairs:
            groups = round((1 + math.sqrt(1 + 8 * len(self.pairs))) / 2)
            return self.dim // groups
        return None

    @property
    def mean_diversity_normalized(self) -> float:
        """Mean diversity / mean diversity of the same groups of the random table of the same
        shape (the table the IA baseline is drawn from): 1 = as different as random sets.

        NaN where it is undefined: no pairs, or a table of at most ``diversity_group_width``
        rows, where any two full-rank groups span all of R^rows and diversity is 0 whatever
        training does (the random table's too)."""
        width = self.diversity_group_width
        random = self.random_mean_diversity
        if self.mean_diversity is None or random is None or width is None or self.rows <= width:
            return math.nan
        return _ratio(self.mean_diversity, random)

    @property
    def set_rank_bound(self) -> bool:
        """A set has fewer rows than columns: its rank (and its random baseline's) is capped
        by the id count, not by training."""
        return self.rows < self.dim

    @property
    def overall_rank_bound(self) -> bool:
        """The field's M sets concatenated have fewer rows than columns (rows < M*K)."""
        return self.rows < self.num_sets * self.dim

    @property
    def diversity_rank_bound(self) -> bool:
        """Two compared groups cannot be independent (rows < 2 x group width): at least
        ``2w - rows`` of their principal angles are 0 for any table, the random one included,
        so the diversity ratio rests on few free directions (none when rows <= w)."""
        width = self.diversity_group_width
        return width is not None and self.rows < 2 * width


def diversity_groups(num_sets: int, dim: int, column_groups: int | None) -> tuple[str, list[slice]]:
    if num_sets > 1:
        return "sets", [slice(m * dim, (m + 1) * dim) for m in range(num_sets)]
    if column_groups and column_groups > 1 and dim % column_groups == 0:
        w = dim // column_groups
        return "column_groups", [slice(g * w, (g + 1) * w) for g in range(column_groups)]
    return "none", []


def analyze_field(
    fg: FieldGram,
    seed: int = 0,
    column_groups: int | None = None,
    rtol: float = DEFAULT_RTOL,
) -> FieldCollapse:
    """All metrics of one field from its Gram (and the cached random baseline of its shape).

    ``column_groups``: for a single-set field, split its columns into this many groups and
    report their diversity (the paper's SE-vs-ME comparison, Figure 10a); ignored when the
    field has several sets.
    """
    m, k, g = fg.num_sets, fg.dim, fg.gram
    rand = random_gram(fg.rows, m * k, seed)
    rand_set_s = singular_values_from_gram(rand[:k, :k])
    rand_set_ia = ia_of_singular_values(rand_set_s)
    rand_all_s = singular_values_from_gram(rand)
    rand_all_ia = ia_of_singular_values(rand_all_s)
    set_s = [singular_values_from_gram(fg.block(i, i)) for i in range(m)]
    set_ia = [ia_of_singular_values(s) for s in set_s]
    full = fg.has_cross_blocks
    overall_s = singular_values_from_gram(g) if full else None
    overall_ia = ia_of_singular_values(overall_s) if full else None
    kind, groups = diversity_groups(m, k, column_groups)
    if not full and kind == "sets":
        kind, groups = "none", []
    pairs = set_pairs(g, groups, rtol) if groups else []
    rand_pairs = set_pairs(rand, groups, rtol) if groups else []
    return FieldCollapse(
        field=fg.field,
        rows=fg.rows,
        num_sets=m,
        dim=k,
        set_ia=set_ia,
        set_ia_normalized=[_ratio(ia, rand_set_ia) for ia in set_ia],
        set_random_ia=rand_set_ia,
        set_spectra=[s.tolist() for s in set_s],
        set_random_spectrum=rand_set_s.tolist(),
        overall_ia=overall_ia,
        overall_ia_normalized=_ratio(overall_ia, rand_all_ia) if overall_ia is not None else None,
        overall_random_ia=rand_all_ia,
        overall_spectrum=overall_s.tolist() if overall_s is not None else None,
        overall_random_spectrum=rand_all_s.tolist(),
        diversity_groups=kind,
        pairs=pairs,
        mean_diversity=_mean([p.diversity for p in pairs]) if pairs else None,
        random_mean_diversity=_mean([p.diversity for p in rand_pairs]) if rand_pairs else None,
    )


# ---- a whole model ----------------------------------------------------------------------


@dataclass
class CollapseReport:
    """The collapse metrics of every field of one model (a checkpoint or a live job).

    ``to_dict()`` / ``to_json()`` give the JSON written to ``collapse.json`` (NaN as null);
    ``summary()`` the means over fields, e.g. for Prometheus gauges.
    """

    source: str
    label: str
    fields: list[FieldCollapse]
    num_sets: int
    dim: int
    step: int | None = None
    model: str | None = None
    embedding: dict[str, Any] | None = None
    world_size: int | None = None
    seconds: float | None = None

    def get_field(self, name: str) -> FieldCollapse:
        for f in self.fields:
            if f.field == name:
                return f
        raise KeyError(name)

    def summary(self) -> dict[str, Any]:
        fs = self.fields
        return {
            "fields": len(fs),
            "mean_set_ia": _mean([f.mean_set_ia for f in fs]),
            "mean_set_ia_normalized": _mean([f.mean_set_ia_normalized for f in fs]),
            "mean_set_random_ia": _mean([f.set_random_ia for f in fs]),
            "mean_overall_ia": _mean([f.overall_ia for f in fs]),
            "mean_overall_ia_normalized": _mean([f.overall_ia_normalized for f in fs]),
            "mean_overall_random_ia": _mean([f.overall_random_ia for f in fs]),
            "mean_diversity": _mean([f.mean_diversity for f in fs]),
            "mean_random_diversity": _mean([f.random_mean_diversity for f in fs]),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return _json_safe(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CollapseReport":
        d = dict(d)
        d.pop("summary", None)
        fields = []
        for f in d.pop("fields"):
            f = dict(f)
            f["pairs"] = [SetPair(**p) for p in f.get("pairs", [])]
            fields.append(FieldCollapse(**_nan_back(f)))
        return cls(fields=fields, **d)


def _ratio(a: float | None, b: float) -> float:
    if a is None or not (b > 0) or math.isnan(a):
        return math.nan
    return a / b


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


_NAN_FIELDS = ("set_random_ia", "overall_random_ia")


def _nan_back(f: dict[str, Any]) -> dict[str, Any]:
    """null -> NaN where the dataclass holds a plain float (lists keep null as NaN too)."""
    for key in _NAN_FIELDS:
        if f.get(key) is None:
            f[key] = math.nan
    for key in ("set_ia", "set_ia_normalized"):
        f[key] = [math.nan if v is None else v for v in f.get(key, [])]
    for p in f.get("pairs", []):
        if p.similarity is None:
            p.similarity = math.nan
        if p.diversity is None:
            p.diversity = math.nan
    return f
