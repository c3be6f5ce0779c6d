"""Shared entry-point behaviour: bad input is one clear line on stderr and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from modeconn.errors import ModeconnError


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except ModeconnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
