"""``palate federate serve`` and ``join``: the server and a client as real processes.

Both run on Flower's deployment engine (:mod:`.engine`): the server hosts a SuperLink and
runs Palate's ServerApp (SecAgg+ with 3+ clients, the DP strategy of :mod:`.apps`) against
it; a client starts a SuperNode and runs Palate's ClientApp, fed from this user's encrypted
store, for every task it receives. TLS is Flower's: the server takes ``(ca.crt, server.pem,
server.key)`` and a client the CA certificate (:func:`make_certificates` writes such a set
for a private deployment). Without TLS both sides refuse any address but the loopback.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palate.errors import PalateError
from palate.federation.accounting import Budget, epsilon_for
from palate.federation.apps import FederationPlan, PalateClient, build_client_app, build_strategy
from palate.federation.engine import is_loopback

log = logging.getLogger(__name__)

__all__ = [
    "StoreLedger",
    "TlsFiles",
    "is_loopback",
    "join",
    "make_certificates",
    "serve",
]


@dataclass(frozen=True)
class TlsFiles:
    """A directory with ``ca.crt`` (clients need only this), ``server.pem``, ``server.key``."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def server_certificates(self) -> tuple[bytes, bytes, bytes]:
        try:
            return (
                self.ca.read_bytes(),
                (self.directory / "server.pem").read_bytes(),
                (self.directory / "server.key").read_bytes(),
            )
        except OSError as e:
            raise PalateError(
                "invalid_request",
                f"TLS files missing in {self.directory}: {e.strerror} "
                "(`palate federate certs` writes a set)",
            ) from e


def make_certificates(
    directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """A private CA and a server certificate for ``hosts`` and 127.0.0.1 (keys 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    # The server's own ServerApp reaches its SuperLink over the loopback address.
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1"]))
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Palate federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "server.pem": cert.public_bytes(pem),
        "server.key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "ca.key": ca_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    for name, blob in files.items():
        path = directory / name
        path.write_bytes(blob)
        path.chmod(0o600 if name.endswith(".key") else 0o644)
    return TlsFiles(directory)


def _check_transport(address: str, tls: TlsFiles | None) -> None:
    if tls is None and not is_loopback(address):
        raise PalateError(
            "invalid_request",
            f"{address} is not a loopback address: federating over a network needs TLS "
            "(--tls DIR; `palate federate certs` writes a set)",
        )


# ---------------------------------------------------------------------------------- server


def serve(
    plan: FederationPlan,
    address: str = "127.0.0.1:9092",
    tls: TlsFiles | None = None,
    initial_arrays: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run ``plan.rounds`` rounds with ``plan.clients`` clients, then return a summary.

    The server needs no base model and sees no data: it starts from one client's seeded
    initial weights, averages clipped updates (only their sum under SecAgg+) and adds the
    noise. Flower's SuperLink listens on ``address`` for the clients' SuperNodes.
    """
    from palate.federation.engine import LocalSuperLink, quiet_flower

    _check_transport(address, tls)
    quiet_flower()
    from palate.federation.apps import build_server_app

    certificates = None
    if tls is not None:
        tls.server_certificates()  # every file is there (a clear error otherwise)
        certificates = (tls.ca, tls.directory / "server.pem", tls.directory / "server.key")
    strategy = build_strategy(plan, initial_arrays=initial_arrays)
    app = build_server_app(plan, strategy)
    t0 = time.monotonic()
    with LocalSuperLink(address, certificates) as link:
        link.start_run({"federation": plan.federation, "rounds": plan.rounds})
        link.run_server_app(app)
    seconds = time.monotonic() - t0
    rounds_done = len(strategy.noise_log)
    return {
        "federation": plan.federation,
        "rounds": plan.rounds,
        "rounds_aggregated": rounds_done,
        "clients": plan.clients,
        "min_clients": plan.min_clients or plan.clients,
        "secagg": plan.secagg,
        "noise_multiplier": plan.noise_multiplier,
        "clipping": plan.clipping,
        "aggregator": plan.aggregator,
        "delta": plan.delta,
        # The bound a client that joined every aggregated round holds (its ledger says).
        "epsilon_per_client": (
            epsilon_for([plan.noise_multiplier] * rounds_done, plan.delta)
            if plan.noise_multiplier > 0
            else None
        ),
        "noise": strategy.noise_log,
        "tls": tls is not None,
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------- client


class StoreLedger:
    """The privacy ledger and shared adapter in this user's encrypted store."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def multipliers(self) -> list[float]:
        return [float(r["noise_multiplier"]) for r in self.store.federated_rounds()]

    def record(
        self, federation: str, round: int, z: float, clip: float, delta: float, eps: float
    ) -> None:
        self.store.record_federated_round(
            federation=federation,
            round=round,
            noise_multiplier=z,
            clipping_norm=clip,
            delta=delta,
            epsilon=eps,
        )

    def save_adapter(self, federation: str, meta: dict[str, Any], blob: bytes) -> None:
        self.store.set_federated_adapter(federation, meta, blob)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM ends this process through ``finally`` blocks (the SuperNode child stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def join(
    client: PalateClient,
    address: str,
    tls: TlsFiles | None = None,
    *,
    max_wait_s: float = 60.0,
    on_stop: Callable[[str], None] | None = None,
) -> str:
    """Take part until the server ends the run or the budget is spent; says which.

    Flower's SuperNode (a child process) keeps the connection to the server; this process
    runs each ClientApp task it receives. After the last round's new global weights have
    arrived it waits for the server to finish (so the acknowledgement reaches it); when the
    budget runs out it stops taking part. ``finished`` also when the server could not be
    reached for ``max_wait_s`` (Flower's SuperNode gives up).
    """
    from palate.federation.engine import (
        ClientTaskRunner,
        Endpoint,
        SuperNodeProcess,
        quiet_flower,
        wait_until_gone,
    )

    _check_transport(address, tls)
    quiet_flower()
    app = build_client_app(lambda _context: client)
    ca = tls.ca if tls is not None else None
    if ca is not None and not ca.is_file():
        raise PalateError("invalid_request", f"no CA certificate at {ca}")
    reason = "finished"
    with _terminate_raises(), SuperNodeProcess(address, ca, max_wait_s=max_wait_s) as node:
        runner = ClientTaskRunner(node, app)
        while node.alive():
            runner.run_next(wait_s=1.0)
            if client.exhausted:
                reason = "budget"
                time.sleep(2.0)  # the SuperNode sends the refusal on
                break
            rounds = runner.rounds
            if rounds and client.delivered_round >= rounds:
                wait_until_gone(Endpoint(address, ca), timeout_s=max_wait_s)
                break
    if on_stop is not None:
        on_stop(reason)
    return reason


__all__ += ["Budget"]
