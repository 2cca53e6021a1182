"""An in-process Flower Grid: a ServerApp drives ClientApps in this process.

Flower's simulation engine needs Ray; this Grid implements Flower's public ``Grid``
interface instead and hands every message to the destination node's ClientApp. Each message
and each reply goes through Flower's protobuf serialization (``message_to_proto``) and is
rebuilt from those bytes on the other side, so the ClientApp sees exactly what the wire
would carry, the byte counts are real, and a test can read every byte that was "sent"
(``capture=True``). A ClientApp that raises produces an error reply, as on a real SuperNode.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.client import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

__all__ = ["LoopbackGrid", "WireLog"]


@dataclass
class WireLog:
    """Bytes sent each way, per node, and (with ``capture``) the bytes themselves."""

    capture: bool = False
    down: dict[int, int] = field(default_factory=dict)  # server -> node
    up: dict[int, int] = field(default_factory=dict)  # node -> server
    messages: list[tuple[int, str, str, bytes]] = field(default_factory=list)

    def add(self, node: int, direction: str, kind: str, blob: bytes) -> None:
        table = self.down if direction == "down" else self.up
        table[node] = table.get(node, 0) + len(blob)
        if self.capture:
            self.messages.append((node, direction, kind, blob))


def _wire(message: Message) -> bytes:
    return bytes(message_to_proto(message).SerializeToString())


def _unwire(blob: bytes) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(blob)
    return message_from_proto(proto)


class LoopbackGrid(Grid):
    """``n`` nodes, each a ClientApp with its own persistent Context.

    ``node_config(i)`` is node ``i``'s (0-based) node config, ``{"index": i}`` by default.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_config: Callable[[int], dict[str, str | int | float | bool]] | None = None,
        wire: WireLog | None = None,
        run_id: int = 1,
    ) -> None:
        self.app = client_app
        self.wire = wire or WireLog()
        self._run = Run.create_empty(run_id)
        # Flower stamps every new message with the identity of "the task in this process":
        # the server's while it runs, each node's while its ClientApp runs.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.node_ids = [SUPERLINK_NODE_ID + 1 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config=dict(node_config(i)) if node_config else {"index": i},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        blob = _wire(msg)
        self.wire.add(node, "down", msg.metadata.message_type, blob)
        received = _unwire(blob)
        TaskIdentity.node_id = node
        try:
            reply = self.app(received, self.contexts[node])
        except Exception as ex:  # the node's ClientApp failed: an error reply, as Flower does
            log.warning("node %d failed: %s", node, ex)
            log.debug("%s", traceback.format_exc())
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex).__name__}: {ex}"
                ),
                reply_to=received,
            )
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        blob = _wire(reply)
        self.wire.add(node, "up", msg.metadata.message_type, blob)
        return _unwire(blob)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            if not msg.metadata.created_at:
                msg.metadata.created_at = time.time()
            reply = self._deliver(msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
