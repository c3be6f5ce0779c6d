"""Shared entry-point behaviour: bad input (and a file that cannot be read or written) is one
clear line on stderr and exit status 2."""

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
    except OSError as e:  # a path we cannot read or write (permissions, a full disk): name it
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
