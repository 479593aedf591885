"""Collapse metrics relative to the random table of the same shape, and the fields whose id
count caps their rank: what ``FieldCollapse`` derives and what ``Telemetry`` exports (the
series the alert rules read). Fast: Grams of small tables, no training, no Prometheus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.demo_collapse import demo_report
from trainer.collapse.analysis import analyze_field, set_pairs
from trainer.collapse.gram import field_gram, random_gram
from trainer.telemetry import Telemetry


def _sets(rows: int, dim: int = 10, num_sets: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (rows, dim)) / math.sqrt(rows) for _ in range(num_sets)]


def _samples(telemetry: Telemetry, name: str) -> dict[tuple, float]:
    """``{labels without run, sorted: value}`` of one metric of a Telemetry's registry."""
    out = {}
    for family in telemetry.registry.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))] = s.value
    return out


def test_diversity_ratio_is_against_the_same_sets_of_the_ia_baselines_random_table():
    fc = analyze_field(field_gram(_sets(300), field="f"))
    groups = [slice(0, 10), slice(10, 20)]
    random = set_pairs(random_gram(300, 20), groups)[0].diversity  # the table random IA comes from
    assert fc.random_mean_diversity == pytest.approx(random, abs=1e-12)
    assert fc.mean_diversity_normalized == pytest.approx(fc.mean_diversity / random, rel=1e-12)
    assert 0.8 < fc.mean_diversity_normalized < 1.2  # random sets are as diverse as random sets
    assert not (fc.set_rank_bound or fc.overall_rank_bound or fc.diversity_rank_bound)


def test_converged_sets_have_a_diversity_ratio_near_zero():
    first = _sets(2000)[0]
    rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    fc = analyze_field(field_gram([first, first @ rotation], field="f"))
    assert fc.mean_diversity_normalized < 1e-6
    assert fc.mean_set_ia_normalized > 0.9  # each set alone is healthy: only the ratio of diversity sees it


@pytest.mark.parametrize("rows", [3, 6, 10])
def test_a_field_of_at_most_dim_ids_has_no_diversity_ratio(rows):
    """Any two full-rank sets of an r-row table span all of R^r: diversity 0, like random sets'."""
    fc = analyze_field(field_gram(_sets(rows), field="small"))
    assert fc.mean_diversity == pytest.approx(0.0, abs=1e-9)
    assert fc.random_mean_diversity == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(fc.mean_diversity_normalized)
    assert fc.set_rank_bound == (rows < 10) and fc.overall_rank_bound and fc.diversity_rank_bound


@pytest.mark.parametrize("rows, set_bound, overall_bound, diversity_bound", [
    (11, False, True, True), (19, False, True, True), (20, False, False, False), (100, False, False, False),
])  # fmt: skip
def test_rank_bound_flags_the_tables_with_fewer_rows_than_columns(rows, set_bound, overall_bound, diversity_bound):
    fc = analyze_field(field_gram(_sets(rows), field="f"))
    assert (fc.set_rank_bound, fc.overall_rank_bound, fc.diversity_rank_bound) == (set_bound, overall_bound, diversity_bound)
    assert 0 < fc.random_mean_diversity and math.isfinite(fc.mean_diversity_normalized)


def test_four_sets_are_rank_bound_together_before_they_are_pairwise():
    fc = analyze_field(field_gram(_sets(30, num_sets=4), field="f"))  # 30 ids: pairs of 20 columns fit, 40 do not
    assert fc.overall_rank_bound and not fc.diversity_rank_bound and not fc.set_rank_bound


def test_column_groups_of_a_single_table_use_their_own_width():
    table = _sets(12, dim=8, num_sets=1)[0]
    fc = analyze_field(field_gram([table], field="se"), column_groups=2)  # two groups of 4 columns
    assert fc.diversity_group_width == 4
    assert not fc.set_rank_bound and not fc.diversity_rank_bound and math.isfinite(fc.mean_diversity_normalized)
    fc = analyze_field(field_gram([table[:4]], field="se"), column_groups=2)
    assert math.isnan(fc.mean_diversity_normalized) and fc.diversity_rank_bound
    assert analyze_field(field_gram([table], field="se")).diversity_group_width is None


def test_telemetry_exports_the_ratios_with_rank_bound_and_skips_undefined_ones():
    report = demo_report()
    telemetry = Telemetry("demo")
    telemetry.record_collapse(report)
    ratios = _samples(telemetry, "ctr_embedding_set_diversity_ratio")
    raw = _samples(telemetry, "ctr_embedding_set_diversity")
    fields = {f.field: f for f in report.fields}
    small = {name for name, f in fields.items() if f.rows <= report.dim}
    assert len(small) == 12 and len(raw) == 39  # the raw diversity is exported for every field
    assert {dict(k)["field"] for k in ratios} == set(fields) - small
    bound = {dict(k)["field"] for k in ratios if dict(k)["rank_bound"] == "true"}
    assert bound == {"I12", "C1"}  # 17 ids: fewer than the 20 columns of two sets
    for key, value in ratios.items():
        f = fields[dict(key)["field"]]
        assert value == pytest.approx(f.mean_diversity / f.random_mean_diversity)
    ia = _samples(telemetry, "ctr_embedding_information_abundance_ratio")
    assert len(ia) == 39 * 3
    for key in ia:
        labels = dict(key)
        f = fields[labels["field"]]
        expected = f.overall_rank_bound if labels["set"] == "all" else f.set_rank_bound
        assert labels["rank_bound"] == ("true" if expected else "false"), labels
