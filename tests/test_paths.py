"""Path rules: PALATE_HOME, the socket length limit and its fallback, private dirs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError
from palate.paths import MAX_SOCKET_PATH, ensure_private_dir, resolve


def test_palate_home_holds_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALATE_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "elsewhere"))
    p = resolve()
    for path in (p.config_file, p.db_file, p.key_file, p.log_dir, p.socket, p.lock_file):
        assert str(path).startswith(str(tmp_path)), path


def test_long_home_falls_back_to_short_hashed_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    p = resolve(deep)
    assert len(os.fsencode(str(p.socket))) <= MAX_SOCKET_PATH
    assert not str(p.socket).startswith(str(deep))
    assert resolve(deep).socket == p.socket, "the fallback is stable for the same home"
    assert resolve(tmp_path / ("d" * 60) / ("f" * 60)).socket != p.socket


def test_daemon_runs_with_a_long_home(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 70) / ("y" * 40)
    deep.mkdir(parents=True)
    d = DaemonProc(deep, daemon_env(deep)).start()
    try:
        assert d.paths.socket.parent.stat().st_mode & 0o777 == 0o700
        with d.client() as c:
            c.ingest({"kind": "pair", "source": "t", "prompt": "p", "chosen": "a", "rejected": "b"})
    finally:
        d.terminate()


def test_private_dir_rules(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ensure_private_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o700
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(PalateError, match="symlink"):
        ensure_private_dir(link)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        with pytest.raises(PalateError, match="owned by uid 65534"):
            ensure_private_dir(foreign)


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process starts with TMPDIR=/tmp; whatever use_private_tmp changes is undone."""
    monkeypatch.delenv("PALATE_USER_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/tmp")
    monkeypatch.setattr(tempfile, "tempdir", None)
    yield
    tempfile.tempdir = None


@pytest.mark.usefixtures("shared_tmp")
def test_daemon_and_its_children_use_a_private_tmpdir(tmp_path: Path) -> None:
    """MLX loads cached kernels from $TMPDIR: it must never be the shared /tmp."""
    p = resolve(tmp_path / "h")
    p.use_private_tmp()
    assert os.environ["TMPDIR"] == str(p.tmp_dir)
    assert tempfile.gettempdir() == str(p.tmp_dir)
    assert p.tmp_dir.stat().st_mode & 0o777 == 0o700
    home = tmp_path / "d"
    home.mkdir()
    d = DaemonProc(home, daemon_env(home)).start()
    try:
        tmp = d.paths.tmp_dir
        assert tmp.is_dir() and tmp.stat().st_mode & 0o777 == 0o700
    finally:
        d.terminate()


@pytest.mark.usefixtures("shared_tmp")
def test_children_of_the_daemon_find_the_same_short_socket_path(tmp_path: Path) -> None:
    """An adapter inherits the daemon's private TMPDIR; the socket fallback must not move."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    before = resolve(deep).socket
    resolve(deep).use_private_tmp()
    assert tempfile.gettempdir() != "/tmp"
    assert resolve(deep).socket == before
