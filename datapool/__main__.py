"""``python -m datapool``: the same as the ``datapool`` command."""

from datapool.cli import app

app()
