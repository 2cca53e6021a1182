"""The encrypted store: the SQLCipher database with its migrations, events, cursors, audit log
and model registry (``database``), the data key and its wrapping (``keys``), and the one thread
that owns the connection in the daemon (``writer``).

Never imports MLX, the model, the runtime, the wire server or the CLI.
"""
