"""The running daemon: process start-up and shutdown (``daemon``), the socket server and wire
methods (``server``, ``api``), the scoring thread (``serving``), training runs as a child
process (``jobs``, ``training_child``), the nightly schedule (``scheduler``, ``power``) and
adapter supervision (``supervisor``).

Composes the parts below it; never imports the CLI or the service installer.
"""
