"""Generation: sample candidates from a local policy, pick among them with the reward model,
and train/evaluate/gate a DPO policy adapter (docs/generation.md).

Sits beside ``palate.adapters``: it imports ``palate.model`` and ``palate.evaluation``, and
``palate.runtime`` and ``palate.cli`` import it. It never imports the wire, the store or the
runtime: the daemon hands it the loaded reward model and callables for the store.
"""
