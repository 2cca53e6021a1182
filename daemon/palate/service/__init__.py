"""Living on the user's machine: the login service (LaunchAgent / systemd user unit,
``manager``) and ``palate doctor``'s checks, grouped by what they look at.

Reads the parts to diagnose them but never changes data; never imports the runtime or the CLI.
"""
