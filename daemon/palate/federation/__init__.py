"""Federated training on Flower, opt-in and off by default (docs/federated.md).

Several people improve one shared starting point for their reward models while every
event stays on its own machine: each client trains LoRA/head weights locally, and only
that update — clipped in L2 norm, noised by the Flower DP strategy wrapper, and (where the
deployment supports it) masked by SecAgg+ — is sent. Nothing else crosses the wire.

- :mod:`palate.model.local_update` (in the model, the only subpackage that imports MLX)
  trains and evaluates one client's LoRA/head weights as plain arrays;
- :mod:`.accounting` turns rounds joined into epsilon at a fixed delta (Flower's RDP
  accountant over Google's dp-accounting) and keeps the per-user budget;
- :mod:`.apps` builds the Flower ClientApp (DP clipping mods, SecAgg+) and the server
  strategy (FedAvg or a robust variant inside Flower's client-side DP wrapper);
- :mod:`.loopback` runs a Flower ServerApp against in-process ClientApps, serializing every
  message exactly as the wire would (the simulation, and what the tests inspect);
- :mod:`.simulate` deals a data set into non-IID shards and measures global vs local;
- :mod:`.deploy` runs the server and clients as real processes (TLS as Flower does) on
  :mod:`.engine`, Flower's deployment engine (a SuperLink, SuperNodes, SecAgg+).

Beside the runtime in the layers (pyproject.toml): it trains through :mod:`palate.model`
and reads the store, and never imports the runtime, the service or the CLI (only the CLI
imports it). Flower (``flwr``) is an optional dependency (``pip install
'palate[federated]'``) that no other subpackage imports.
"""
