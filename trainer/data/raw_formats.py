"""The raw log formats ``trainer.data.preprocess`` reads: Criteo Kaggle TSV and Avazu CSV."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError


@dataclass(frozen=True)
class RawFormat:
    """Layout of one raw format and its default min-count.

    Every column of a row is listed in ``columns`` (file order). Integer fields
    become both a token field and a dense feature; categorical fields are kept
    as strings; ``dropped`` columns are read (so the column count is checked)
    and thrown away.
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


_CRITEO_INTEGERS = tuple(f"I{i}" for i in range(1, 14))
_CRITEO_CATEGORICALS = tuple(f"C{i}" for i in range(1, 27))

CRITEO = RawFormat(
    name="criteo",
    delimiter="\t",
    has_header=False,
    quoted=False,
    columns=("label",) + _CRITEO_INTEGERS + _CRITEO_CATEGORICALS,
    label="label",
    integer_fields=_CRITEO_INTEGERS,
    categorical_fields=_CRITEO_CATEGORICALS,
    dropped=(),
    default_min_count=10,
)

_AVAZU_FIELDS = (
    "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip

AVAZU = RawFormat(
    name="avazu",
    delimiter=",",
    has_header=True,
    quoted=True,
    columns=("id", "click") + _AVAZU_FIELDS,
    label="click",
    integer_fields=(),
    categorical_fields=_AVAZU_FIELDS,
    dropped=("id",),  # read as a string: it overflows int64
    default_min_count=4,
)

FORMATS = {f.name: f for f in (CRITEO, AVAZU)}


def raw_format(name: str) -> RawFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; expected one of {sorted(FORMATS)}") from None
