"""The CLIs explain themselves: ``trainer.main --help`` lists every config key with its type,
default and doc (walked here from the dataclasses, independently of the code that prints
them), choices and defaults are shown, and ``python -m bench --help`` runs nothing.

(That every CLI's ``--help`` answers without torch and without raw reStructuredText is
checked in tests/test_structure.py.)"""

from __future__ import annotations

import dataclasses
import re
import time
import typing

import pytest

from tests.helpers import PYTHON, run
from trainer.cli_help import HelpFormatter, description, plain
from trainer.job_config import TrainConfig

# one entry of the epilog: "  train.epochs (int, default 10): passes over the train split"
ENTRY = re.compile(r"^  (?P<key>[a-z_]+(?:\.[a-z_.]+)?) \((?P<type>[^,]+), (?:default (?P<default>.*?)|(?P<required>required))\):(?P<doc>.*)$")


def config_fields(cls: type = TrainConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of the config (dotted) -> its dataclass field."""
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def expected_default(f: dataclasses.Field) -> str | None:
    """A default as YAML writes it (None: required)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        assert not value, "a non-empty mapping default: teach this test how YAML writes it"
        return "{}"
    return str(value)


def test_every_config_field_has_one_line_of_doc():
    def walk(cls):
        for f in dataclasses.fields(cls):
            yield cls, f
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp)

    for cls, f in walk(TrainConfig):
        doc = f.metadata.get("doc")
        assert doc and isinstance(doc, str), f"{cls.__name__}.{f.name} has no metadata={{'doc': ...}}"
        assert "\n" not in doc and "``" not in doc, f"{cls.__name__}.{f.name}: one line of plain text, got {doc!r}"


def test_trainer_help_lists_every_config_key_with_type_default_and_doc():
    proc = run([PYTHON, "-m", "trainer.main", "--help"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    entries = {m["key"]: m for m in map(ENTRY.match, text.splitlines()) if m}
    fields = config_fields()
    assert set(entries) == set(fields), f"missing {sorted(set(fields) - set(entries))}, extra {sorted(set(entries) - set(fields))}"
    for key, f in fields.items():
        entry = entries[key]
        default = expected_default(f)
        if default is None:
            assert entry["required"], f"{key} is required"
        else:
            assert entry["default"] == default, f"{key}: help says default {entry['default']!r}, the dataclass {default!r}"
        assert entry["doc"].strip(), f"{key} has no doc in --help"
    # a few types and lines spelled out
    assert "  train.epochs (int, default 10): passes over the train split" in text
    assert "  data.path (str, required): " in text
    assert "  model.cin_layers (list of int, default [16, 16]): " in text
    assert "  sharding.storage_cap_bytes (int or null, default null): " in text
    assert "  optim.dense_lr (float, default 0.001): " in text
    # grouped by section, each with its line of doc
    assert re.search(r"^train: epochs, batch size", text, re.M) and re.search(r"^monitoring: ", text, re.M)
    assert "(default: auto)" in text, "--resume shows its default"


def test_preprocess_and_synthetic_declare_their_choices(capsys):
    from trainer.data import preprocess, synthetic

    for main, needles in (
        (preprocess.main, ["--dataset {ads_log,avazu,criteo,criteo_1tb,criteo_kaggle_csv}", "--on-bad-rows {fail,skip}",
                           "(default: the spec's split.ratios)"]),
        (synthetic.main, ["--format {parquet,criteo-tsv}", "(default: parquet)"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for needle in needles:
            assert needle in " ".join(out.split()), f"{needle!r} not in:\n{out}"
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(["--dataset", "kaggle", "--input", "x", "--output", "y"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'kaggle'" in capsys.readouterr().err


def test_help_text_helpers():
    assert plain("Run ``python -m x --help``; then::") == "Run python -m x --help; then:"
    assert description("First ``a``\nline.\n\nSecond.") == "First a\nline."
    import argparse

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=3, help="how many")
    p.add_argument("--name", help="no default to show")
    p.add_argument("--flag", action="store_true", help="off by default")
    p.add_argument("--mode", default="a", help="a or b (default a)")
    text = " ".join(p.format_help().split())
    assert "how many (default: 3)" in text
    assert "no default to show --flag" in text and "(default: None)" not in text and "(default: False)" not in text
    assert "(default a) (default" not in text


def test_bench_help_runs_nothing():
    started = time.monotonic()
    proc = run([PYTHON, "-m", "bench", "--help"], timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout and "--only" in proc.stdout
    assert "===" not in proc.stdout, "a benchmark started"
    for name in ("cli_help", "loader", "checkpoint", "paper_findings"):
        assert f"  {name} " in proc.stdout, f"{name} not listed"
    assert took < 20, f"python -m bench --help took {took:.1f}s"
    refused = run([PYTHON, "-m", "bench", "--only", "no-such-benchmark"], timeout=60)
    assert refused.returncode == 2 and "unknown benchmark" in refused.stderr and "===" not in refused.stdout
