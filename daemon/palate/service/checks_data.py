"""Doctor checks of where the data lives and how it is locked: directory permissions, free
disk space, the data key's backend and recovery key, and (on macOS) the login keychain.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from pathlib import Path

from palate.errors import PalateError
from palate.paths import MAX_SOCKET_PATH, Paths
from palate.service.check import Check
from palate.service.manager import Runner, subprocess_runner
from palate.store.keys import KeyManager, keyring_info

#: Below this much free space SQLite commits and checkpoints start failing (storage_full).
DISK_FAIL_BYTES = 512 * 1024**2


#: Below this a training run (the base model's activations cache, new versions) may not fit.
DISK_WARN_BYTES = 2 * 1024**3


def _keychain(paths: Paths) -> Check:
    """The data key: where its KEK lives, and above all whether a recovery kit exists."""
    info = keyring_info()
    km = KeyManager.for_home(paths)
    try:
        status = km.status()
    except PalateError as e:
        fix = "`palate key recover` < your recovery kit (or restore key.json)"
        return Check("key", "fail", e.message, fix)
    if not km.exists():
        return Check(
            "key",
            "warn",
            f"no data key yet (the daemon makes one at its first start; backend {status.backend})",
            "start the daemon (`palate service install`), then `palate key recovery-export`",
        )
    where = "keychain entry" if status.backend == "keyring" else "key file"
    if status.recovery == "none":
        return Check(
            "key",
            "fail",
            f"no recovery kit: if the {where} or key.json is lost, every event is lost "
            f"(key backend: {status.backend})",
            "`palate key recovery-export`, keep the kit offline, then "
            "`palate key recovery-confirm` < kit-file",
        )
    if status.backend == "keyring" and not info.usable:
        return Check(
            "key",
            "fail",
            f"key backend: keyring, but {info.detail}",
            "unlock/start your keychain, or `palate key recover` < your recovery kit",
        )
    if status.warning:
        return Check(
            "key",
            "warn",
            f"key backend: {status.backend} ({status.warning})",
            "install and unlock a keychain, then `palate key rotate --backend keyring`",
        )
    if status.recovery == "unconfirmed":
        return Check(
            "key",
            "warn",
            f"key backend: keyring ({info.detail}); recovery kit exported but not confirmed",
            "`palate key recovery-confirm` < kit-file (checks the copy you kept)",
        )
    return Check("key", "ok", f"key backend: keyring ({info.detail}); recovery kit confirmed")


def _permissions(paths: Paths) -> Check:
    bad = []
    for d in (paths.home, paths.data_dir, paths.run_dir):
        if d.exists():
            st = os.lstat(d)
            if st.st_uid != os.getuid() or st.st_mode & 0o077 or stat.S_ISLNK(st.st_mode):
                bad.append(f"{d} ({oct(st.st_mode & 0o777)})")
    if bad:
        return Check(
            "permissions",
            "fail",
            "not private: " + ", ".join(bad),
            "chmod 700 those directories (Palate does this when it creates them)",
        )
    sock = len(os.fsencode(str(paths.socket)))
    return Check(
        "permissions",
        "ok",
        f"data dirs are 0700; socket path {paths.socket} ({sock}/{MAX_SOCKET_PATH} bytes)",
    )


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(paths: Paths) -> Check:
    """Free space where the database lives (a full disk fails commits, so ingestion)."""
    where = _existing(paths.data_dir)
    free = shutil.disk_usage(where).free
    text = f"{free / 1024**3:.1f} GiB free on the volume of {where}"
    if free < DISK_FAIL_BYTES:
        return Check(
            "disk",
            "fail",
            text + "; new feedback cannot be stored",
            "free disk space; `palate models` lists old versions you can drop",
        )
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", text + "; training may not fit", "free some disk space")
    return Check("disk", "ok", text)


# --- macOS keychain ---------------------------------------------------------------------

#: Security framework status codes that show up in `security` output and keyring errors.
ERR_INTERACTION_NOT_ALLOWED = -25308  # locked, and no UI to ask (SSH, launchd user/ domain)


ERR_AUTH_FAILED = -25293


ERR_NO_SUCH_KEYCHAIN = -25294


def classify_keychain(text: str, returncode: int = 1, recovery: str = "none") -> Check:
    """Map ``security show-keychain-info`` (or a keyring error) to a check.

    ``recovery`` is the state of the recovery kit: advice that would destroy or abandon the
    keychain entry holding Palate's key (resetting the default keychains, making a new one)
    is given only when a confirmed kit can bring the data back; otherwise the advice keeps
    the existing keychain.
    """
    low = text.lower()
    codes = {int(c) for c in re.findall(r"-25\d\d\d", text)}
    kit = recovery == "confirmed"
    if returncode == 0:
        return Check("keychain", "ok", f"default keychain is unlocked ({text.strip()[:120]})")
    if ERR_INTERACTION_NOT_ALLOWED in codes or "user interaction is not allowed" in low:
        return Check(
            "keychain",
            "fail",
            "the login keychain is locked, and nothing can ask you for its password here "
            "(an SSH session, or the agent runs outside your GUI login); the daemon cannot "
            "unwrap its key",
            "unlock it: `security unlock-keychain ~/Library/Keychains/login.keychain-db`, "
            "or log in at the Mac; then `palate service restart`",
        )
    if ERR_NO_SUCH_KEYCHAIN in codes or "could not be found" in low:
        if kit:
            fix = (
                "Keychain Access › File › New Keychain (make it the default), then "
                "`palate key recover` < your recovery kit"
            )
        else:
            fix = (
                "restore ~/Library/Keychains/login.keychain-db from a backup (Time Machine): "
                "Palate's key is in it and you have no confirmed recovery kit; once the key "
                "works again, `palate key recovery-export`"
            )
        return Check("keychain", "fail", "no login keychain found", fix)
    if ERR_AUTH_FAILED in codes:
        if kit:
            fix = (
                "update the login keychain's password (Keychain Access › Edit › Change "
                'Password for Keychain "login"); or reset it and then `palate key recover` '
                "< your recovery kit (resetting deletes the key in it)"
            )
        else:
            fix = (
                "do NOT reset your default keychains: that deletes Palate's key and you have "
                "no confirmed recovery kit. Change the login keychain's password to your "
                "login password instead (Keychain Access › Edit › Change Password for "
                'Keychain "login", with the old one), then `palate key recovery-export`'
            )
        what = "the login keychain password does not match your login password"
        return Check("keychain", "fail", what, fix)
    return Check("keychain", "warn", f"keychain state unclear: {text.strip()[:200]}")


def keychain_lock_check(
    paths: Paths, runner: Runner = subprocess_runner, platform: str = sys.platform
) -> Check:
    """On macOS: is the login keychain (which holds the key ``palate``) unlocked?"""
    if platform != "darwin":
        return Check("keychain", "ok", "not macOS: no login keychain to unlock")
    r = runner(["security", "show-keychain-info"], capture=True, timeout=10)
    try:
        recovery = KeyManager.for_home(paths).status().recovery
    except PalateError:
        recovery = "none"
    return classify_keychain(r.stdout + r.stderr, r.returncode, recovery)
