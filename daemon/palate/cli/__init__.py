"""The ``palate`` command (click): one module per command group, each a thin layer that turns
library errors into one clear line and a documented exit code (docs/cli.md).

Nothing imports this package; it holds no logic the library lacks.
"""

from palate.cli.main import cli, main

__all__ = ["cli", "main"]
