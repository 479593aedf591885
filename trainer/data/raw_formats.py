"""The CSV/TSV layout of a dataset spec (``RawFormat``), and the shipped Criteo and Avazu layouts."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.dataset_spec import DatasetSpec, shipped_spec
from trainer.errors import UserError


@dataclass(frozen=True)
class RawFormat:
    """How the text rows of a dataset look, and its field roles.

    ``columns``: without a header, every column of a row (file order); with one,
    the columns the spec names (found by name). Integer fields (numeric with the
    ``criteo_log`` token) become both a token field and a dense feature;
    ``dropped`` columns are ignored.
    """

    name: str
    delimiter: str
    has_header: bool
    quoted: bool  # whether values may be quoted ("a,b")
    columns: tuple[str, ...]
    label: str
    integer_fields: tuple[str, ...]
    categorical_fields: tuple[str, ...]
    dropped: tuple[str, ...]
    default_min_count: int

    @property
    def sparse_fields(self) -> tuple[str, ...]:
        return self.integer_fields + self.categorical_fields

    @classmethod
    def from_spec(cls, spec: DatasetSpec) -> "RawFormat":
        return cls(
            name=spec.name,
            delimiter=spec.input.sep,
            has_header=spec.input.header,
            quoted=spec.input.quoted,
            columns=tuple(c.name for c in spec.columns),
            label=spec.label.name,
            integer_fields=tuple(c.name for c in spec.columns if c.type == "numeric" and c.token == "criteo_log"),
            categorical_fields=tuple(c.name for c in spec.columns if c.type == "categorical"),
            dropped=tuple(c.name for c in spec.columns if c.type == "ignore"),
            default_min_count=spec.defaults.min_count,
        )


CRITEO = RawFormat.from_spec(shipped_spec("criteo"))
AVAZU = RawFormat.from_spec(shipped_spec("avazu"))
FORMATS = {f.name: f for f in (CRITEO, AVAZU)}


def raw_format(name: str) -> RawFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; expected one of {sorted(FORMATS)}") from None
