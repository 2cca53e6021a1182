"""`palate federate serve` and `join` as real processes over 127.0.0.1, with Flower's TLS.

The server and the client are separate `palate` processes; the client trains the tiny
model from its own encrypted store. Nothing listens beyond the loopback address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from palate.federation.accounting import epsilon_for
from palate.federation.deploy import make_certificates
from test_federation import make_home
from tiny_lm import save_tiny_model_dir

pytestmark = pytest.mark.slow

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def palate(*args: str, home: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PALATE_KEY_BACKEND": "file", "PYTHONUNBUFFERED": "1"}
    if home is not None:
        env["PALATE_HOME"] = str(home)
    return subprocess.Popen(
        [sys.executable, "-m", "palate.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fed")
    model = save_tiny_model_dir(root / "tiny")
    tls = make_certificates(root / "tls", ["127.0.0.1"])
    flags = [
        "--base-model",
        model,
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--lora-layers",
        "2",
        "--max-tokens",
        "64",
    ]
    return {"root": root, "tls": tls.directory, "model": flags}


def test_server_and_client_processes_over_tls(setup: dict[str, Any]) -> None:
    home = setup["root"] / "alice"
    make_home(home, pairs=30, seed=1)
    address = f"127.0.0.1:{free_port()}"
    server = palate(
        "federate",
        "serve",
        "--address",
        address,
        "--clients",
        "1",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        "--tls",
        str(setup["tls"]),
        *setup["model"],
        "--json",
    )
    client = palate(
        "federate",
        "join",
        "--server",
        address,
        "--tls",
        str(setup["tls"]),
        "--budget",
        "20",
        *setup["model"],
        "--json",
        home=home,
    )
    joined = finish(client)
    served = finish(server)
    assert served["tls"] is True and served["rounds_aggregated"] == 2
    assert [n["clients"] for n in served["noise"]] == [1, 1]
    assert served["noise"][0]["std"] == pytest.approx(1.5 * 0.5 / 1)
    assert joined["stopped"] == "finished" and joined["rounds_joined"] == 2
    assert joined["epsilon"] == pytest.approx(epsilon_for([1.5, 1.5]))
    status = finish(palate("federate", "status", "--json", home=home))
    assert status["rounds_joined"] == 2
    assert status["adapter"]["round"] == 2  # the final shared weights came back


def test_client_process_stops_at_its_budget(setup: dict[str, Any]) -> None:
    home = setup["root"] / "bob"
    make_home(home, pairs=30, seed=2)
    address = f"127.0.0.1:{free_port()}"
    budget = epsilon_for([1.5, 1.5]) + 0.01  # two rounds fit, the third would not
    server = palate(
        "federate",
        "serve",
        "--address",
        address,
        "--clients",
        "1",
        "--rounds",
        "3",
        "--local-steps",
        "2",
        "--tls",
        str(setup["tls"]),
        *setup["model"],
        "--json",
    )
    try:
        client = palate(
            "federate",
            "join",
            "--server",
            address,
            "--tls",
            str(setup["tls"]),
            "--budget",
            str(budget),
            *setup["model"],
            "--json",
            home=home,
        )
        joined = finish(client)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # it would wait for a client for round 3
        server.wait(10)
    assert joined["stopped"] == "budget"
    assert joined["rounds_joined"] == 2 and joined["epsilon"] <= budget
    status = finish(palate("federate", "status", "--json", home=home))
    assert status["rounds_joined"] == 2 and status["budget"] == pytest.approx(budget)
