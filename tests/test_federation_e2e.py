"""`palate federate serve` and `join` as real processes over 127.0.0.1, with Flower's TLS.

The server and the clients are separate `palate` processes on Flower's deployment engine
(the server hosts a SuperLink, each client starts a SuperNode); each client trains the tiny
model from its own encrypted store. With 3 clients the rounds run SecAgg+. Nothing listens
beyond the loopback address.
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


def palate(
    *args: str, home: Path | None = None, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PALATE_KEY_BACKEND": "file",
        "PYTHONUNBUFFERED": "1",
        **(env_extra or {}),
    }
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


def finish(proc: subprocess.Popen[str], returncode: int = 0) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == returncode, err[-3000:]
    return json.loads(out) if returncode == 0 else {}


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


def _team(
    setup: dict[str, Any], name: str, server_flags: list[str], exit_in_round: dict[int, int]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Path]]:
    """A server and 3 client processes for one round; ``exit_in_round``: client -> round."""
    homes = [setup["root"] / f"{name}{i}" for i in range(3)]
    for i, home in enumerate(homes):
        make_home(home, pairs=24, seed=10 + i)
    address = f"127.0.0.1:{free_port()}"
    server = palate(
        "federate",
        "serve",
        "--address",
        address,
        "--clients",
        "3",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        *server_flags,
        *setup["model"],
        "--json",
    )
    clients = []
    try:
        for i, home in enumerate(homes):
            env = {}
            if i in exit_in_round:
                env["PALATE_FEDERATE_TEST_EXIT_IN_ROUND"] = str(exit_in_round[i])
            tls = ["--tls", str(setup["tls"])] if "--tls" in server_flags else []
            clients.append(
                palate(
                    "federate",
                    "join",
                    "--server",
                    address,
                    *tls,
                    "--budget",
                    "20",
                    *setup["model"],
                    "--json",
                    home=home,
                    env_extra=env,
                )
            )
        joined = [
            finish(c, 0 if i not in exit_in_round else 128 + 15) for i, c in enumerate(clients)
        ]
        served = finish(server)
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return served, joined, homes


def test_three_clients_secagg_plus_over_tls(setup: dict[str, Any]) -> None:
    """A SecAgg+ round between 4 processes: the strategy gets only the unmasked sum."""
    served, joined, homes = _team(setup, "sa", ["--tls", str(setup["tls"])], {})
    assert served["secagg"] is True and served["tls"] is True
    assert served["rounds_aggregated"] == 1
    (noise,) = served["noise"]
    assert noise["clients"] == 3 and noise["failures"] == 0
    assert noise["std"] == pytest.approx(1.5 * 0.5 / 3)
    # Three clients trained on different data, yet all three results the strategy received
    # carry the same vector: SecAgg+ unmasked only their sum, never one client's update.
    assert noise["distinct_updates"] == 1
    for out, home in zip(joined, homes, strict=True):
        assert out["stopped"] == "finished" and out["rounds_joined"] == 1
        assert out["epsilon"] == pytest.approx(epsilon_for([1.5]))
        status = finish(palate("federate", "status", "--json", home=home))
        assert status["rounds_joined"] == 1
        assert status["last_round"]["epsilon"] == pytest.approx(epsilon_for([1.5]))
        assert status["adapter"]["round"] == 1  # the new global weights came back


def test_secagg_round_survives_a_client_exiting_mid_round(setup: dict[str, Any]) -> None:
    """Client 2 ends (SIGTERM) while it trains; SecAgg+ recovers the others' sum."""
    served, joined, homes = _team(setup, "drop", ["--min-clients", "2"], {2: 1})
    assert served["secagg"] is True and served["rounds_aggregated"] == 1
    (noise,) = served["noise"]
    assert noise["clients"] == 2  # averaged, and the noise scaled to them
    assert noise["std"] == pytest.approx(1.5 * 0.5 / 2)
    assert noise["distinct_updates"] == 1
    for out, home in zip(joined[:2], homes[:2], strict=True):
        assert out["stopped"] == "finished" and out["rounds_joined"] == 1
        assert finish(palate("federate", "status", "--json", home=home))["adapter"]["round"] == 1
    gone = finish(palate("federate", "status", "--json", home=homes[2]))
    assert gone["rounds_joined"] == 0  # it left before its update: nothing charged
