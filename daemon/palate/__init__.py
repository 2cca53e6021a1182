"""Palate: a private, per-user daemon that learns a personal reward model.

The package is a library first: every part (protocol, events, store, keys, model)
is usable without the daemon, and the CLI (`palate.cli.main`) is a thin layer on top.
"""

import os

# transformers (used only for tokenizers) warns on import that PyTorch is absent. Palate never
# uses PyTorch, so on every CLI call that line would be noise; a user's own setting wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

#: Wire API level. Raised only when methods or keys are added (additive-only);
#: a signature never changes within a level. See docs/protocol.md.
API_LEVEL = 1

__all__ = ["API_LEVEL", "__version__"]
