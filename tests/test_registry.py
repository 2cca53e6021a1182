"""Registry over the socket and the CLI: list, show, deploy (with override), rollback."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import DaemonProc, daemon_env
from palate.cli.main import EXIT_CODES
from palate.store.database import Store
from palate.store.keys import KeyManager


def seed_models(d: DaemonProc) -> list[int]:
    s = Store(d.paths.db_file, KeyManager(d.paths).unwrap())
    try:
        return [
            s.add_model(
                base_model="builtin:smollm2-135m",
                artifact=b"a",
                meta={
                    "metrics": {"accuracy": 0.61},
                    "decision": "deploy",
                    "reasons": ["beats baselines"],
                },
            ),
            s.add_model(
                base_model="builtin:smollm2-135m",
                artifact=b"b",
                meta={
                    "metrics": {"accuracy": 0.9},
                    "decision": "hold",
                    "reasons": ["suspicious jump of +29 points"],
                },
                state="held",
            ),
            s.add_model(
                base_model="builtin:smollm2-135m",
                artifact=b"c",
                meta={
                    "metrics": {"accuracy": 0.64},
                    "decision": "deploy",
                    "reasons": ["beats baselines"],
                },
            ),
        ]
    finally:
        s.close()


def test_registry_commands(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    d.terminate()
    v1, v2, v3 = seed_models(d)
    d.start()
    rows = json.loads(d.cli("models", "--json").stdout)
    assert [r["version"] for r in rows] == [v3, v2, v1]
    assert {"version", "state", "created", "metrics", "decision", "reasons"} <= set(rows[0])
    assert rows[1]["state"] == "held" and rows[1]["metrics"]["accuracy"] == 0.9
    assert "accuracy" in d.cli("models").stdout

    assert d.cli("deploy", str(v1)).returncode == 0
    held = d.cli("deploy", str(v2))
    assert held.returncode == EXIT_CODES["conflict"] and "--override" in held.stderr
    r = d.cli("deploy", str(v2), "--override", "--reason", "I checked it", "--json")
    assert json.loads(r.stdout) == {"deployed": v2, "previous": v1}
    show = json.loads(d.cli("models", "show", str(v2), "--json").stdout)
    assert show["state"] == "deployed" and show["reasons"] == ["suspicious jump of +29 points"]
    r = d.cli("rollback", "--json")
    assert json.loads(r.stdout) == {"deployed": v1, "previous": v2}
    with d.client() as c:
        hist = c.call("models")["deployments"]
    assert [h["how"] for h in hist] == ["rollback", "override", "manual"]
    missing = d.cli("deploy", "999")
    assert missing.returncode == EXIT_CODES["not_found"]
