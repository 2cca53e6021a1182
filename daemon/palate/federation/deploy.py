"""``palate federate serve`` and ``join``: the server and a client as real processes.

The server is Flower's gRPC server (``flwr.server.start_server``) running the strategy of
:mod:`.apps`; a client is Flower's client loop (``start_client_internal``) running the
ClientApp of :mod:`.apps`, fed from this user's encrypted store. TLS is Flower's: the server
takes ``(ca.crt, server.pem, server.key)`` and a client the CA certificate
(:func:`make_certificates` writes such a set for a private deployment). Without TLS both
sides refuse any address but the loopback.

SecAgg+ runs where Flower's workflow API drives the round (the simulation, a Flower
SuperLink deployment); Flower's gRPC server loop used here has no SecAgg+ (docs/federated.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palate.errors import PalateError
from palate.federation.accounting import Budget, epsilon_for
from palate.federation.apps import FederationPlan, PalateClient, build_client_app, build_strategy

log = logging.getLogger(__name__)

__all__ = [
    "StoreLedger",
    "TlsFiles",
    "is_loopback",
    "join",
    "make_certificates",
    "serve",
]


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    """A private CA and a server certificate for ``hosts`` (the key files are 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

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
    initial weights, averages clipped updates and adds the noise.
    """
    import flwr

    _check_transport(address, tls)
    strategy = build_strategy(plan, initial_arrays=initial_arrays)
    t0 = time.monotonic()
    history = flwr.server.start_server(
        server_address=address,
        config=flwr.server.ServerConfig(num_rounds=plan.rounds),
        strategy=strategy,
        certificates=tls.server_certificates() if tls is not None else None,
    )
    seconds = time.monotonic() - t0
    rounds_done = len(strategy.noise_log)
    return {
        "federation": plan.federation,
        "rounds": plan.rounds,
        "rounds_aggregated": rounds_done,
        "clients": plan.clients,
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
        "history_rounds": len(getattr(history, "losses_distributed", []) or []),
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


def join(
    client: PalateClient,
    address: str,
    tls: TlsFiles | None = None,
    *,
    max_wait_s: float = 60.0,
    on_stop: Callable[[str], None] | None = None,
) -> str:
    """Take part until the server ends the run or the budget is spent; says which.

    Flower's client loop runs in a worker thread; this thread watches for the budget
    running out and then stops taking part (the process exits after returning).
    """
    from flwr.compat.client.app import start_client_internal

    _check_transport(address, tls)
    app = build_client_app(lambda _context: client)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            start_client_internal(
                server_address=address,
                node_config={},
                load_client_app_fn=lambda *_: app,
                root_certificates=tls.ca.read_bytes() if tls is not None else None,
                insecure=tls is None,
                max_wait_time=max_wait_s,
            )
        except BaseException as e:  # SystemExit from Flower when it gives up, too
            failure.append(e)

    worker = threading.Thread(target=loop, name="flower-client", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        if client.exhausted:
            reason = "budget"
            break
    else:
        reason = "finished"
        if failure and not isinstance(failure[0], SystemExit):
            raise PalateError("unavailable", f"the Flower client stopped: {failure[0]}")
    if on_stop is not None:
        on_stop(reason)
    return reason


__all__ += ["Budget"]
