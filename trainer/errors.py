"""User-facing errors and the CLI wrapper that prints them without a traceback."""

from __future__ import annotations

import logging
import sys
from typing import Callable


class UserError(Exception):
    """Bad input or a request that cannot be met. The message says what and where."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a command-line entry point: a ``UserError`` becomes ``error: ...`` and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
