"""Flower's deployment engine for ``serve`` and ``join``: a SuperLink and SuperNodes.

Flower 1.42 runs a federation as a **SuperLink** (the server side: Fleet, Control and
Runtime APIs on one HTTP(S) port, uvicorn) and one **SuperNode** per client (polls the
SuperLink's Fleet API and serves a Runtime API on loopback to the process that runs the
ClientApp). A run is started through the SuperLink's Control API with a FAB (a zip with a
``pyproject.toml`` naming the ServerApp and ClientApp). With ``--isolation process`` Flower
leaves running the apps to "a separate independent process" that acquires each task from
the Runtime API (``AcquireTask``, authenticated with a SuperExec secret), pulls its input,
runs the app and pushes the output. That process is Palate's:

- ``serve`` hosts the SuperLink (Flower's ``create_app`` and lifespan, on uvicorn, in a
  thread), starts one run through the Control API, acquires the run's ServerApp task and
  runs Palate's ServerApp (:func:`.apps.build_server_app`, SecAgg+ included) in-process on
  Flower's ``HttpGrid``: the strategy, its noise log and its result stay in this process.
- ``join`` starts Flower's ``flower-supernode`` as a child process and runs every ClientApp
  task of it in-process (the model loaded once, the store open, the budget watched).

The Control and Runtime APIs share the Fleet port in Flower 1.42; here they answer loopback
peers only (the Fleet API is what remote SuperNodes use), and the Runtime API's
``AcquireTask`` needs a random per-process SuperExec secret on both sides.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palate.errors import PalateError

log = logging.getLogger(__name__)


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine (a plain, untrusted transport is refused
    anywhere else; the SuperLink's own APIs answer loopback peers only)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "ClientTaskRunner",
    "Endpoint",
    "LocalSuperLink",
    "SuperNodeProcess",
    "build_fab",
    "free_port",
    "host_port",
]

#: What Flower's own telemetry would send home; Palate turns it off in its processes.
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
_LOCAL_ONLY = ("/v1/control", "/v1/runtime")

FAB_PYPROJECT = b"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "palate-federation"
version = "1.0.0"
description = "Palate: federated reward-model training (the apps ship with palate)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "palate"

[tool.flwr.app.components]
serverapp = "palate.federation.apps:server_app"
clientapp = "palate.federation.apps:client_app"

[tool.flwr.app.config]
federation = "palate"
rounds = 1
"""


def quiet_flower() -> None:
    """No telemetry (read by Flower at import time, so call before importing ``flwr``)."""
    os.environ.setdefault(TELEMETRY_ENV, "0")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PalateError("invalid_request", f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def build_fab() -> bytes:
    """The minimal FAB a run needs: Palate's apps come from the installed package."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": FAB_PYPROJECT})[0]


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach an HTTP(S) API of Flower's."""

    address: str
    ca: Path | None = None  # None: plain HTTP (loopback only)

    def client(self, interceptors: list[Any], *, retries: bool = True) -> Any:
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.ca is None,
            root_certificates=self.ca.read_bytes() if self.ca is not None else None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker() if retries else None,
        )


# ---------------------------------------------------------------------------------- server


class _LoopbackOnly:
    """ASGI wrapper: the Control and Runtime APIs answer loopback peers only."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and str(scope.get("path", "")).startswith(_LOCAL_ONLY):
            peer = scope.get("client") or ("", 0)
            if not is_loopback(f"{peer[0]}:0"):
                await send({"type": "http.response.start", "status": 403, "headers": []})
                await send({"type": "http.response.body", "body": b"loopback only"})
                return
        await self.app(scope, receive, send)


class LocalSuperLink:
    """Flower's SuperLink in this process (``isolation=process``), stopped by :meth:`close`."""

    def __init__(self, address: str, certificates: tuple[Path, Path, Path] | None = None) -> None:
        self.host, self.port = host_port(address)
        self.certificates = certificates  # (ca.crt, server.pem, server.key)
        self.secret = secrets.token_bytes(32)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def local(self) -> Endpoint:
        """This SuperLink as its own ServerApp reaches it (the certificate names 127.0.0.1)."""
        ca = self.certificates[0] if self.certificates else None
        return Endpoint(f"127.0.0.1:{self.port}", ca)

    def start(self, timeout_s: float = 30.0) -> LocalSuperLink:
        import uvicorn
        from flwr.common.constant import ISOLATION_MODE_PROCESS, TRANSPORT_TYPE_GRPC_RERE
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
        from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
        from flwr.superlink.config_loader import (
            SuperLinkLifespanConfig,
            load_control_authn_plugin,
        )
        from flwr.superlink.main import create_app

        tls = self.certificates
        if tls is not None:
            certificates: tuple[bytes, bytes, bytes] | None = (
                tls[0].read_bytes(),
                tls[1].read_bytes(),
                tls[2].read_bytes(),
            )
        else:
            certificates = None
        config = SuperLinkLifespanConfig(
            control_address="127.0.0.1:0",  # the gRPC Control API stays off (HTTP only)
            health_server_address=None,
            host=self.host,
            port=self.port,
            insecure=tls is None,
            certificates=certificates,
            superexec_auth_secret=self.secret,
            authn_plugin=load_control_authn_plugin(),
            event_log_plugin=None,
            fleet_event_log_plugin=None,
            enable_event_log=False,
            artifact_provider=None,
            enable_supernode_auth=False,
            fleet_api_type=TRANSPORT_TYPE_GRPC_RERE,
            fleet_api_address=None,
            simulation=False,
            ssl_ca_certfile=str(tls[0]) if tls else None,
            ssl_certfile=str(tls[1]) if tls else None,
            ssl_keyfile=str(tls[2]) if tls else None,
            database=FLWR_IN_MEMORY_DB_NAME,
            isolation=ISOLATION_MODE_PROCESS,
            runtime_dependency_install=False,
        )
        app = create_app(config, SuperLinkLifespan)
        self._server = uvicorn.Server(
            uvicorn.Config(
                app=_LoopbackOnly(app),
                host=self.host,
                port=self.port,
                workers=1,
                access_log=False,
                log_level="warning",
                ssl_certfile=str(tls[1]) if tls else None,
                ssl_keyfile=str(tls[2]) if tls else None,
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="superlink", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PalateError(
                    "unavailable",
                    f"the Flower SuperLink could not listen on {self.host}:{self.port} "
                    "(port in use?)",
                )
            time.sleep(0.05)
        return self

    def start_run(self, override_config: dict[str, Any] | None = None) -> int:
        """Start one run through the Control API, as ``flwr run`` would."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.fab import Fab

        fab = build_fab()
        ep = self.local
        scheme = "https" if ep.ca is not None else "http"
        verify: Any = True
        if ep.ca is not None:
            verify = ssl.create_default_context(cafile=str(ep.ca))
        client = ControlHttpClient(f"{scheme}://{ep.address}", verify=verify)
        try:
            res = client.StartRun(
                StartRunRequest(
                    fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                    override_config=user_config_to_proto(override_config or {}),
                    federation="",
                )
            )
        finally:
            client.close()
        if not res.HasField("run_id"):
            raise PalateError("internal_error", "the SuperLink did not start the run")
        return int(res.run_id)

    def run_server_app(self, server_app: Any, timeout_s: float = 30.0) -> Any:
        """Acquire the run's ServerApp task and run ``server_app`` on Flower's HttpGrid.

        What ``flwr-serverapp`` does, with the app object from this process instead of one
        loaded from the FAB. Returns the final Context.
        """
        from flwr.common.constant import SubStatus
        from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
        from flwr.proto.runtime_pb2 import (
            PullTaskInputRequest,
            PushTaskOutputRequest,
        )
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.superlink.grid import HttpGrid

        ep = self.local
        token = _acquire(ep, self.secret, "flwr-serverapp", timeout_s)
        grid = HttpGrid(
            runtime_api_address=ep.address,
            insecure=ep.ca is None,
            root_certificates=ep.ca.read_bytes() if ep.ca is not None else None,
            token=token,
        )
        runtime = grid._runtime_client  # the Runtime API client with this task's token
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
        heartbeat.start()
        context = None
        status, details = SubStatus.FAILED, "ServerApp failed"
        try:
            res = runtime.PullTaskInput(PullTaskInputRequest())
            TaskIdentity.task_id = res.task_id
            TaskIdentity.run_id = res.run.run_id
            TaskIdentity.node_id = res.context.node_id
            context = context_from_proto(res.context)
            grid.set_run(run_from_proto(res.run))
            server_app(grid=grid, context=context)
            status, details = SubStatus.COMPLETED, ""
            return context
        except BaseException as e:
            details = f"ServerApp failed: {e}"
            raise
        finally:
            try:
                runtime.PushTaskOutput(
                    PushTaskOutputRequest(
                        context=context_to_proto(context) if context is not None else None,
                        sub_status=status,
                        details=details,
                    )
                )
            except Exception as e:  # the run ends either way
                log.warning("could not report the ServerApp's end: %s", e)
            heartbeat.stop()
            grid.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> LocalSuperLink:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _acquire(ep: Endpoint, secret: bytes, task_type: str, timeout_s: float) -> str:
    """Wait for a task of ``task_type`` and return its token."""
    token = _try_acquire(_acquire_client(ep, secret), task_type, until=time.monotonic() + timeout_s)
    if token is None:
        raise PalateError("unavailable", f"no {task_type} task to run within {timeout_s:g} s")
    return token


def _acquire_client(ep: Endpoint, secret: bytes, *, retries: bool = True) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    return ep.client(
        [
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[_ACQUIRE]),
        ],
        retries=retries,
    )


def _try_acquire(client: Any, task_type: str, until: float, poll_s: float = 0.1) -> str | None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    while True:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
        if res.HasField("task") and res.token:
            return str(res.token)
        if time.monotonic() >= until:
            return None
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------- client


#: ``flower-supernode``, which also ends (Flower's own parent monitor, as ``flwr-clientapp``
#: uses it) when the process that started it is gone, even if that one was killed outright:
#: a SuperNode left behind would keep answering heartbeats and never run a task.
_SUPERNODE_MAIN = (
    "import sys; from flwr.supercore.app_utils import start_parent_process_monitor; "
    "start_parent_process_monitor(int(sys.argv.pop(1))); "
    "from flwr.supernode.cli import flower_supernode; flower_supernode()"
)


class SuperNodeProcess:
    """Flower's ``flower-supernode`` as a child process (``--isolation process``).

    It holds the connection to the SuperLink; the ClientApp tasks it receives are run by
    this process (:class:`ClientTaskRunner`) through its Runtime API on a loopback port.
    """

    def __init__(self, superlink: str, ca: Path | None, *, max_wait_s: float) -> None:
        self.superlink = superlink
        self.ca = ca
        self.max_wait_s = max_wait_s
        self.port = free_port()
        self.secret = secrets.token_bytes(32)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def runtime(self) -> Endpoint:
        return Endpoint(f"127.0.0.1:{self.port}")

    def start(self) -> SuperNodeProcess:
        self._dir = tempfile.TemporaryDirectory(prefix="palate-supernode-")
        secret_file = Path(self._dir.name) / "superexec.secret"
        secret_file.touch(0o600)
        secret_file.write_bytes(self.secret)
        tls = ["--root-certificates", str(self.ca)] if self.ca is not None else ["--insecure"]
        cmd = [
            sys.executable,
            "-c",
            _SUPERNODE_MAIN,
            str(os.getpid()),
            "--superlink",
            self.superlink,
            *tls,
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--superexec-auth-secret-file",
            str(secret_file),
            "--max-wait-time",
            str(self.max_wait_s),
        ]
        env = {**os.environ, TELEMETRY_ENV: os.environ.get(TELEMETRY_ENV, "0")}
        # Its log goes to stderr, as Flower's does; stdout stays this command's (--json).
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> SuperNodeProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ClientTaskRunner:
    """Runs the ClientApp tasks of one SuperNode in this process, one at a time.

    What ``flwr-clientapp`` does for each task (pull the message and context, call the
    ClientApp, push the reply and the new context), with the ClientApp object from this
    process; a ClientApp that raises produces an error reply, as Flower's does.
    """

    def __init__(self, node: SuperNodeProcess, client_app: Any) -> None:
        self.node = node
        self.app = client_app
        self._acquirer: Any = None
        self.tasks = 0
        #: The run's number of rounds (from its run config), once a task has arrived.
        self.rounds = 0

    def run_next(self, wait_s: float) -> bool:
        """Run one task if one arrives within ``wait_s``; says whether one ran."""
        import httpx

        if self._acquirer is None:
            self._acquirer = _acquire_client(self.node.runtime, self.node.secret, retries=False)
        try:
            token = _try_acquire(self._acquirer, "flwr-clientapp", until=time.monotonic() + wait_s)
        except httpx.HTTPError:  # the SuperNode is starting (or gone: the caller checks)
            time.sleep(min(wait_s, 0.5))
            return False
        if token is None:
            return False
        self._run(token)
        self.tasks += 1
        return True

    def _run(self, token: str) -> None:
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        client = self.node.runtime.client(
            [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ]
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = None
        status, details = SubStatus.FAILED, "ClientApp failed"
        try:
            message, context, _run, _fab = pull_task_input(client)
            self.rounds = int(context.run_config.get("rounds", 0) or 0)
            try:
                reply = self.app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as ex:
                log.warning("the ClientApp raised %s: %s", type(ex).__name__, ex)
                reason = f"{type(ex)}:<'{ex}'>"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=message,
                )
                details = reason
            push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()


def wait_until_gone(endpoint: Endpoint, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Wait until nothing answers at ``endpoint`` (the server has finished)."""
    import httpx

    verify: Any = False
    if endpoint.ca is not None:
        verify = ssl.create_default_context(cafile=str(endpoint.ca))
    scheme = "https" if endpoint.ca is not None else "http"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{scheme}://{endpoint.address}/health", verify=verify, timeout=2.0)
        except httpx.HTTPError:
            return True
        time.sleep(poll_s)
    return False


__all__ += ["quiet_flower", "wait_until_gone"]
