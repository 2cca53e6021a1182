"""The UI's one connection to the daemon: an :class:`AsyncClient` that reconnects once."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from palate.errors import PalateError
from palate.wire.client import AsyncClient


class DaemonLink:
    """Calls socket methods; a dropped connection (daemon restart, idle close) is reopened
    once per call, so the UI outlives daemon restarts."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._client: AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> AsyncClient:
        async with self._lock:
            if self._client is None:
                self._client = await AsyncClient(socket_path=self.socket_path).connect()
            return self._client

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        for attempt in (1, 2):
            client = await self._connected()
            try:
                return await client.call(method, dict(params or {}))
            except (PalateError, OSError) as e:
                if isinstance(e, PalateError) and e.code != "unavailable":
                    raise
                await self._drop(client)
                if attempt == 2:
                    if isinstance(e, PalateError):
                        raise
                    raise PalateError("unavailable", f"lost the daemon: {e}") from e
        raise AssertionError("unreachable")

    async def _drop(self, client: AsyncClient) -> None:
        async with self._lock:
            if self._client is client:
                self._client = None
        await client.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
