"""Fault injection against the real daemon: kill -9 at random points, a full disk, a lost or
locked keychain, damaged files, crash-looping adapters.

Every test here drives real ``palate daemon`` processes over the real socket and checks the
store through the project's own ``Store`` API afterwards; nothing on the core path is mocked.
``PALATE_FAULT_SEED`` fixes the random kill points of a run (each test prints the seed it
used, so a failure can be replayed).
"""
