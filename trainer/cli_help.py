"""What every CLI's ``--help`` shares: a description taken from the module docstring
without its reStructuredText markup, and argument defaults shown.

Standard library only (a CLI's ``--help`` answers before torch is imported)::

    p = argparse.ArgumentParser(prog=..., description=description(__doc__), formatter_class=HelpFormatter)
"""

from __future__ import annotations

import argparse
import re

_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def plain(text: str) -> str:
    """``text`` with its reStructuredText inline literals unquoted (````x```` -> ``x``) and a
    literal-block ``::`` at a line's end turned into ``:``."""
    text = _LITERAL.sub(r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


def description(doc: str | None) -> str:
    """A CLI's description: the first paragraph of its module docstring, as plain text."""
    return plain((doc or "").strip().split("\n\n")[0])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (``(default: X)``), except where there is nothing to show
    (no default, a flag that is off, an empty list) or the help already says it; keeps the
    description's and epilog's line breaks (an epilog can hold a table of keys)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)
