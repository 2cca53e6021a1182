"""Compatibility entry for browser launchers written before the subpackage layout.

Launchers that ``palate browser install`` wrote with version 0.1.0 run
``python -m palate.native_host``; the host itself lives in :mod:`palate.adapters.native_host`.
"""

from palate.adapters.native_host import main

if __name__ == "__main__":  # pragma: no cover
    main()
