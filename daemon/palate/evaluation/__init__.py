"""Judging models: the stable held-out split, metrics with intervals, held-out evaluation of
scores, the probe set, the gate (a pure decision) and the HTML report.

Works on scores and labels only: never imports MLX, the model, the store or the runtime, so a
gate decision can be replayed and tested without a model.
"""
