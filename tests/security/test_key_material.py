"""Key material never shows up in logs, stderr, CLI output or error responses.

Collected from the real key files / keychain as the test goes: the data key (DEK), every
key-encryption key (KEK) it was wrapped under (rotation and recovery make new ones) and the
recovery key. Then errors are provoked on purpose: bad requests on the socket, a wrong and a
mistyped recovery key, a tampered wrap in key.json, a KEK replaced by another, a missing KEK,
plus rotation, recovery, ``status``, ``key status`` and ``doctor``. Every log file, the
daemon's stderr, every CLI stdout/stderr and every error the daemon sent is then searched
for each secret as raw bytes, hex (either case), base64 (standard and URL-safe, with or
without padding) and base32 / the ``PLT1-`` form. The one output allowed to hold a secret is
the stdout of ``palate key recovery-export`` (that is its job); its stderr is still searched.
Run with both backends: ``file`` and ``keyring`` (a real Secret Service on a private bus).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PALATE, DaemonProc
from palate.errors import PalateError
from palate.paths import resolve
from palate.store.keys import KeyManager, decode_kit, decode_recovery, encode_kit

_LEGACY = (
    "import sys; from pathlib import Path; from palate.paths import resolve; "
    "from palate.store.keys import KeyManager; "
    "print(KeyManager.for_home(resolve(Path(sys.argv[1]))).export_recovery())"
)


def forms(secret: bytes) -> dict[str, bytes]:
    b64 = base64.b64encode(secret)
    b32 = base64.b32encode(secret).rstrip(b"=")
    return {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": b64,
        "base64-body": b64.rstrip(b"=")[:-2],
        "base64-urlsafe": base64.urlsafe_b64encode(secret).rstrip(b"=")[:-2],
        "base32": b32,
        "base32-lower": b32.lower(),
        "base32-grouped": b"-".join(b32[i : i + 4] for i in range(0, len(b32), 4))[:-2],
    }


class Secrets:
    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}
        self.texts: dict[str, bytes] = {}  # secrets in a text form of their own (the kit)

    def add(self, name: str, secret: bytes) -> None:
        assert len(secret) == 32, name
        self.items[name] = bytes(secret)

    def add_kit(self, kit: str) -> None:
        body = kit.replace("-", "")
        self.texts["kit"] = kit.encode()
        self.texts["kit-ungrouped"] = body[8:-8].encode()
        self.texts["kit-ungrouped-lower"] = body[8:-8].lower().encode()
        self.texts["kit-groups"] = kit[10:-10].encode()

    def leaks(self, label: str, data: bytes | str) -> list[str]:
        blob = data.encode("utf-8", "replace") if isinstance(data, str) else data
        return [
            f"{label}: {name} as {form}"
            for name, secret in self.items.items()
            for form, needle in forms(secret).items()
            if needle in blob
        ] + [f"{label}: {name}" for name, needle in self.texts.items() if needle in blob]


def keys_now(env: dict[str, str], home: Path) -> tuple[bytes, bytes]:
    """(DEK, current KEK), read from where the backend keeps them. In a child: the keyring
    backend must see the test's private Secret Service environment."""
    code = (
        "import sys, base64; from palate.store.keys import KeyManager; from palate.paths import "
        "resolve; from pathlib import Path; km = KeyManager(resolve(Path(sys.argv[1]))); "
        "doc = km._require(); kek = km._backend(doc['backend']).get(doc['ref']); "
        "print(base64.b64encode(bytes(km.unwrap())).decode(), base64.b64encode(kek).decode())"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    dek, kek = r.stdout.split()
    return base64.b64decode(dek), base64.b64decode(kek)


@pytest.fixture(params=["file", "keyring"])
def key_env(request: pytest.FixtureRequest, home: Path) -> dict[str, str]:
    if request.param == "keyring":
        base = dict(request.getfixturevalue("secret_service"))
    else:
        base = dict(os.environ)
    base.update(
        {"PALATE_HOME": str(home), "PALATE_KEY_BACKEND": request.param, "PYTHONUNBUFFERED": "1"}
    )
    return base


def test_key_material_never_in_logs_or_errors(home: Path, key_env: dict[str, str]) -> None:
    backend = key_env["PALATE_KEY_BACKEND"]
    keys = Secrets()
    outputs: list[tuple[str, str]] = []  # (label, text) to search at the end

    def cli(
        *args: str, ok: bool | None = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*PALATE, *args], env=key_env, capture_output=True, text=True, timeout=120, input=input
        )
        outputs.append((f"palate {' '.join(args)} (stdout)", r.stdout))
        outputs.append((f"palate {' '.join(args)} (stderr)", r.stderr))
        if ok is not None:
            assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout, r.stderr)
        return r

    d = DaemonProc(home, key_env).start()
    dek, kek = keys_now(key_env, home)
    keys.add("DEK", dek)
    keys.add("KEK gen 1", kek)
    assert KeyManager.for_home(resolve(home)).status().backend == backend

    # Bad requests on the socket: every error message and details.
    with d.client() as c:
        c.ingest({"kind": "pair", "source": "k", "prompt": "p", "chosen": "a", "rejected": "b"})
        for method, params in [
            ("ingest", {"event": {"kind": "pair"}}),
            ("forget", {}),
            ("export", {"path": "relative"}),
            ("export", {"path": str(home / "data" / "key.json")}),
            ("export", {"path": str(home / "no" / "such" / "dir.jsonl")}),
            ("models", {"version": 7}),
            ("cursors", {"adapter": 5}),
            ("no_such_method", {}),
        ]:
            with pytest.raises(PalateError) as ei:
                c.call(method, params)
            outputs.append((f"error {method}", json.dumps(ei.value.to_wire())))
        outputs.append(("status", json.dumps(c.status())))

    # The recovery kit: printed on stdout by recovery-export (its job); nowhere else. It is
    # the data key itself, so the DEK's own forms are searched for too (above).
    r = cli("key", "recovery-export")
    outputs.pop(-2)  # its stdout is allowed to hold the kit
    code = r.stdout.split()[0]
    kit_id, kit_dek = decode_kit(code)
    assert bytes(kit_dek) == keys.items["DEK"]
    keys.add_kit(code)
    # The legacy PLT1 recovery key (a second wrap in key.json) is still searched for.
    legacy = subprocess.run(
        [sys.executable, "-c", _LEGACY, str(home)], env=key_env, capture_output=True, text=True
    )
    assert legacy.returncode == 0, legacy.stderr
    keys.add("legacy recovery key", decode_recovery(legacy.stdout.strip()))
    # Change a character in the middle; a kit that is not base32; a kit of other data.
    wrong = code[:10] + ("A" if code[10] != "A" else "B") + code[11:]
    other = encode_kit(kit_id, os.urandom(32))
    for bad in (wrong, "PLTK-" + "0" * 72, other, legacy.stdout.strip()[:-3] + "AAA"):
        cli("key", "recover", input=bad, ok=False)
    cli("key", "recover", "--code", code, ok=False)  # refused: never a secret in argv
    cli("key", "recovery-confirm", input=other, ok=False)
    cli("key", "recovery-confirm", input=code)
    cli("key", "status")
    if backend == "file":
        cli("doctor", ok=None)  # its exit code reflects warnings (the file backend is one)

    # Rotation: a new KEK while the daemon runs.
    cli("key", "rotate")
    keys.add("KEK gen 2", keys_now(key_env, home)[1])
    assert d.terminate() == 0

    paths = resolve(home)
    doc = json.loads(paths.key_file.read_text())
    pristine = paths.key_file.read_bytes()

    # A tampered wrap: the daemon must refuse to start, naming the problem, not the key.
    ct = bytearray(base64.b64decode(doc["wrapped"]["ct"]))
    ct[0] ^= 1
    paths.key_file.write_text(
        json.dumps({**doc, "wrapped": {**doc["wrapped"], "ct": base64.b64encode(ct).decode()}})
    )
    os.chmod(paths.key_file, 0o600)
    _fails_to_start(home, key_env, outputs)
    paths.key_file.write_bytes(pristine)

    # The KEK replaced by another key (file backend: the file; keyring: the entry).
    other = os.urandom(32)
    _set_kek(key_env, home, other)
    keys.add("substituted KEK", other)
    _fails_to_start(home, key_env, outputs)
    # ... and recovered with the recovery kit, which makes a fresh KEK.
    cli("key", "recover", input=code)
    dek, kek = keys_now(key_env, home)
    keys.add("KEK after recovery", kek)
    assert dek == keys.items["DEK"]

    # The KEK missing altogether.
    if backend == "file":
        saved = {f: f.read_bytes() for f in paths.data_dir.glob("kek-*.kek")}
        for f in saved:
            f.unlink()
        _fails_to_start(home, key_env, outputs)
        for f, data in saved.items():
            f.write_bytes(data)
            os.chmod(f, 0o600)
    d = DaemonProc(home, key_env).start()
    with d.client() as c:
        assert c.status()["events"]["total"] == 1
    assert d.terminate() == 0

    # Search everything.
    leaks: list[str] = []
    for label, text in outputs:
        leaks += keys.leaks(label, text)
    logs = [p for p in paths.log_dir.rglob("*") if p.is_file()] + [d.log]
    assert logs and any(p.stat().st_size for p in logs)
    for p in logs:
        leaks += keys.leaks(str(p), p.read_bytes())
    for p in paths.run_dir.rglob("*"):
        if p.is_file():
            leaks += keys.leaks(str(p), p.read_bytes())
    for p in paths.data_dir.glob("palate.db*"):
        leaks += keys.leaks(str(p), p.read_bytes())
    assert leaks == []
    # The search would have found them (not vacuous): the file backend's KEK file holds one.
    if backend == "file":
        kek_files = list(paths.data_dir.glob("kek-*.kek"))
        assert kek_files and any(keys.leaks("kek", f.read_bytes()) for f in kek_files)


def _fails_to_start(home: Path, env: dict[str, str], outputs: list[tuple[str, str]]) -> None:
    r = subprocess.run([*PALATE, "daemon"], env=env, capture_output=True, text=True, timeout=60)
    outputs.append(("daemon start (stderr)", r.stderr))
    outputs.append(("daemon start (stdout)", r.stdout))
    assert r.returncode != 0, "the daemon started with a bad key"
    assert "key" in (r.stderr + r.stdout).lower()


def _set_kek(env: dict[str, str], home: Path, kek: bytes) -> None:
    code = (
        "import sys, base64; from palate.store.keys import KeyManager; from palate.paths import "
        "resolve; from pathlib import Path; km = KeyManager(resolve(Path(sys.argv[1]))); "
        "doc = km._require(); km._backend(doc['backend']).put(doc['ref'], "
        "base64.b64decode(sys.argv[2]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(home), base64.b64encode(kek).decode()],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
    )
