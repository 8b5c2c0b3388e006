"""datapool: grow an image dataset incrementally and keep it diverse.

The library is importable without typer or dvc; the command-line layers
(``stages/`` and :mod:`datapool.cli`) import those themselves.
"""

__version__ = "0.1.0"
