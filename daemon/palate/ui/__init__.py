"""``palate ui``: a local web app to see, curate and delete your data, answer the review
queue, watch the models and pause collection (docs/ui.md).

The UI server is one more client of the daemon's socket (:mod:`palate.wire.client`): it
never opens the database, never imports the store, the model or the runtime, and holds no
state of its own beyond the launch's secrets. It binds 127.0.0.1 only; every request needs
the per-launch token (in the printed URL, then a cookie) and a Host of 127.0.0.1 or
localhost; every state-changing request must be same-origin and carry the CSRF token
(:mod:`palate.ui.security`).
"""
