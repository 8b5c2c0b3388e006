"""Errors that carry a message meant for the person running datapool.

Every failure a user can cause (bad input, a broken pool file, a missing
checkpoint) raises a subclass of :class:`DatapoolError` whose message names the
file, row or setting at fault and, where there is one, the fix. The stages print
that message and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations


class DatapoolError(Exception):
    """Base class of user-facing errors; ``str(err)`` is the whole message."""


class InputError(DatapoolError):
    """The input folder or a setting is unusable (missing, empty, out of range)."""


class PoolError(DatapoolError):
    """A pool on disk is missing, malformed or incompatible with this run."""


class CheckpointError(DatapoolError):
    """A model checkpoint cannot be loaded or does not match the pool."""
