"""The wire contract: msgpack-RPC framing, limits and message shapes (``protocol``) and the
reference clients every adapter, app and CLI command uses (``client``).

Owns nothing but bytes and their meaning; never imports the store, the model, the runtime or
the CLI (docs/protocol.md is the contract, versioned by ``palate.API_LEVEL``).
"""
