"""What a person sees from a stage: one summary line, or one clear error line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from datapool.errors import DatapoolError


@contextmanager
def user_errors(stage: str) -> Iterator[None]:
    """Turn a :class:`DatapoolError` into ``"<stage>: error: <message>"`` on stderr and exit 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except DatapoolError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
