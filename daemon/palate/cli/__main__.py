"""``python -m palate.cli``: what the LaunchAgent and the systemd unit run."""

from palate.cli.main import main

main()
