"""A full cycle with a unique canary in the user's text, then look everywhere for it.

ingest (canary in prompts and responses, and in a rejected event) -> train a tiny real model
through the daemon (training child, evaluation, gate) -> deploy and score a canary prompt ->
``palate report`` -> export to a path the user chose -> forget everything. Along the way:

* every directory Palate made is 0700 and every file under them 0600 (database, WAL, SHM, key
  and KEK files, lock, socket, logs, report, export); nothing the daemon or the training child
  left in TMPDIR (pointed at a private dir for the test, as are HOME and the caches) is open to
  other users;
* the plaintext canary, in several encodings, is in no file under the Palate home, TMPDIR,
  HOME or caches, in no log, in no CLI output, and not in the report; the export, where the
  user asked for it, does hold it (the scan is not vacuous);
* after ``forget`` (which VACUUMs and truncates the WAL) the canary is in no page of the
  database file or WAL, decrypted with the real key (tests/security/pages.py): SELECT-level
  checks cannot see freed pages, this can. Before forget the same scan finds it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError
from palate.store.keys import KeyManager
from security.pages import decrypted_db, decrypted_wal
from test_canary import encodings, scan
from test_lifecycle import marker_pairs, train
from tiny_gguf import tiny_args, tiny_model, write_gguf

pytestmark = pytest.mark.slow


def needles(canary: str) -> dict[str, bytes]:
    out = encodings(canary)
    out["msgpack-str"] = msgpack.packb(canary)
    out["base64-urlsafe"] = base64.urlsafe_b64encode(canary.encode())[:-4]
    return out


def modes(root: Path, skip: set[Path]) -> list[str]:
    """Everything under root that is not 0700 (directories) / 0600 (anything else).

    MLX's compiled-kernel cache in the daemon's private TMPDIR (``tmp/mlx/...``) holds shared
    libraries, 0700 by nature: not Palate's files, but nothing there may be open to others."""
    bad = []
    for p in [root, *root.rglob("*")]:
        if p in skip:
            continue
        st = p.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if "mlx" in p.relative_to(root).parts[:2] and p.suffix == ".so":
            want = stat.S_IMODE(st.st_mode) & 0o700
        if stat.S_IMODE(st.st_mode) != want or st.st_uid != os.getuid():
            bad.append(f"{p} {stat.filemode(st.st_mode)} uid {st.st_uid}")
    return bad


def private(root: Path) -> list[str]:
    """Everything under root that someone else could read, write or own."""
    bad = []
    for p in root.rglob("*"):
        st = p.lstat()
        if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.getuid():
            bad.append(f"{p} {stat.filemode(st.st_mode)} uid {st.st_uid}")
    return bad


def plaintext_pages(d: DaemonProc) -> bytes:
    dek = KeyManager(d.paths).unwrap()
    try:
        key = bytes(dek)
        db = d.paths.db_file
        return decrypted_db(db, key) + decrypted_wal(Path(f"{db}-wal"), key)
    finally:
        dek[:] = bytes(len(dek))


def test_full_cycle_canary_and_permissions(home: Path) -> None:
    canary = "CANARY" + secrets.token_hex(12)
    private = home.parent / f"{home.name}-env"  # TMPDIR, HOME, caches: private, scanned
    user = home.parent / f"{home.name}-user"  # where the user keeps exports and reports
    for p in (private, user):
        p.mkdir(mode=0o700)
    tmpdir, userhome, cache = private / "tmp", private / "home", private / "cache"
    for p in (tmpdir, userhome, cache):
        p.mkdir(mode=0o700)
    try:
        _cycle(home, canary, tmpdir, userhome, cache, user)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(user, ignore_errors=True)


def _cycle(home: Path, canary: str, tmpdir: Path, userhome: Path, cache: Path, user: Path) -> None:
    args = tiny_args()
    gguf = write_gguf(home / "tiny.gguf", tiny_model(args), args)
    config = home / "config.toml"
    config.write_text(
        f'base_model = "{gguf}"\n'
        "[train]\nepochs = 2\nmax_tokens = 48\nlora_layers = 2\nlora_rank = 4\nstreams = 1\n"
        "lr = 0.003\nwarmup_steps = 2\neval_every = 1000\npatience = 1000\n"
        "[gate]\nprobe_floor = 0.0\nprobe_max_drop = 1.0\nsuspicious_accuracy = 1.01\n"
        "max_jump = 1.0\n"
    )
    env = daemon_env(home, TMPDIR=str(tmpdir), HOME=str(userhome), XDG_CACHE_HOME=str(cache))
    d = DaemonProc(home, env).start()
    # Files the test itself made (the daemon is not answerable for their modes).
    ours = {home, config, gguf, d.log}
    outputs: list[str] = []

    events: list[dict[str, Any]] = []
    for e in marker_pairs(160, "sec"):
        events.append(
            {**e, "prompt": f"{canary} {e['prompt']}", "chosen": f"{e['chosen']} {canary}"}
        )
    with d.client() as c:
        c.ingest_batch(events, cursor={"adapter": "sec", "key": "k", "value": {"n": 1}})
        c.ingest(
            {"kind": "rating", "source": "sec", "prompt": canary, "response": canary, "label": -1}
        )
        c.ingest(
            {
                "kind": "edit",
                "source": "sec",
                "prompt": "p",
                "original": canary,
                "edited": canary + "!",
            }
        )
        c.ingest(
            {
                "kind": "ranking",
                "source": "sec",
                "prompt": canary,
                "responses": [canary, canary + "2", canary + "3"],
            }
        )
        with pytest.raises(PalateError) as ei:  # refused: its text must not reach the log
            c.ingest(
                {
                    "kind": "pair",
                    "source": "sec",
                    "prompt": canary,
                    "chosen": canary,
                    "rejected": canary,
                }
            )
        assert ei.value.code == "invalid_event"
        outputs.append(str(ei.value) + json.dumps(ei.value.details))

    result = train(d)  # the training child trains, evaluates, and the gate decides
    with d.client() as c:
        if not result["deployed"]:
            c.call("deploy", {"version": result["version"], "override": True})
        scored = c.score(f"{canary} question", [f"{canary} answer", "other"])
        assert scored["version"] == result["version"]
        outputs.append(json.dumps(scored))
        outputs.append(json.dumps(c.status()))
        outputs.append(json.dumps(c.call("models")))

    # The report: numbers only, 0600, where the user asked.
    r = d.cli("report", "--out", str(user / "reports"), "--json")
    assert r.returncode == 0, r.stderr
    outputs += [r.stdout, r.stderr]
    report = Path(json.loads(r.stdout)["path"])
    assert report.parent == user / "reports"
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert not [n for n, b in needles(canary).items() if b in report.read_bytes()]

    # The export: the one deliberate plaintext write, at the user's path, 0600.
    export = user / "export.jsonl"
    with d.client() as c:
        n = c.export(export)
    assert n == len(events) + 3
    assert canary.encode() in export.read_bytes(), "the scan below would be vacuous"
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    assert {p.name for p in user.iterdir()} == {"reports", "export.jsonl"}  # no .partial left

    # While running, before forget: modes, and no plaintext anywhere but the export.
    wal = Path(f"{d.paths.db_file}-wal")
    assert wal.exists() and Path(f"{d.paths.db_file}-shm").exists()
    assert d.paths.socket.exists() and d.paths.socket.is_socket()
    assert modes(home, ours) == []
    # Third-party files there (MLX's JIT kernel cache is $TMPDIR/mlx/...) are not Palate's
    # format, but nothing may be open to other users. (HOME and the cache dir follow the
    # user's umask: the CLI's matplotlib makes ~/.config/matplotlib there. Scanned below.)
    assert private(tmpdir) == []
    found = needles(canary)
    for root in (home, tmpdir, userhome, cache):
        assert scan(root, found) == [], f"plaintext canary under {root}"
    assert canary.encode() in plaintext_pages(d), "decryption check is not working"

    with d.client() as c:
        assert c.forget(all=True) == len(events) + 3
        # forget VACUUMs and truncates the WAL before it answers: gone from every page now.
        assert canary.encode() not in plaintext_pages(d), "canary left in db/WAL pages"
        assert c.status()["events"]["total"] == 0
    assert d.terminate() == 0
    assert canary.encode() not in plaintext_pages(d), "canary in db/WAL pages after shutdown"

    # After shutdown: logs, stderr, CLI output, everything under home and the private dirs.
    for root in (home, tmpdir, userhome, cache):
        assert scan(root, found) == [], f"plaintext canary under {root}"
    for text in outputs:
        assert not [n for n, b in found.items() if b in text.encode("utf-8", "replace")], text
    assert modes(home, ours) == []
    log = (d.paths.log_dir / "daemon.log").read_text()
    assert "training run" in log, "the daemon log is where the scan expects it"
