"""The reward model: base model loading (mlx-lm, GGUF), BLAS set-up, LoRA + scalar head,
losses, batching, the training loop, the numpy CPU forward, scoring and self-describing
artifacts. The only subpackage that imports MLX.

Never imports the wire protocol, the store, the runtime or the CLI: it takes examples and gives
weights and scores, so it runs the same in the daemon, the training child and a benchmark.
"""
