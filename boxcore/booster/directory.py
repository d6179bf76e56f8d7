"""The booster's persistent key-value state, kept by boxd (survives restarts of either)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator

from boxcore.booster.errors import BoosterError, BoxdGone

if TYPE_CHECKING:
    from boxcore.booster.control import ControlSession
    from cliruntime import Stats

__all__ = ["DirectoryClient"]


class DirectoryClient:
    """``booster.directory``: get/put/delete/items on the booster's namespace, and watches."""

    def __init__(self, session: "ControlSession", stats: "Stats", max_queue: int = 1024) -> None:
        self._session = session
        self._stats = stats
        self._queues: dict[int, asyncio.Queue] = {}
        # Events can arrive right behind the dir_watch reply, before the watching coroutine has
        # run again to register its queue: they wait here (watch ids only grow, so an id above
        # the last registered one is a watch still being set up).
        self._early: dict[int, list[tuple[str, Any]]] = {}
        self._last_registered = 0
        self.max_queue = max_queue

    async def get(self, key: str, default: Any = None) -> Any:
        result = await self._session.request({"t": "dir_get", "key": key})
        return result["value"] if result["found"] else default

    async def put(self, key: str, value: Any) -> None:
        await self._session.request({"t": "dir_put", "key": key, "value": value})

    async def delete(self, key: str) -> bool:
        result = await self._session.request({"t": "dir_delete", "key": key})
        return bool(result["deleted"])

    async def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        result = await self._session.request({"t": "dir_items", "prefix": prefix})
        return [(k, v) for k, v in result["items"]]

    async def watch(self, prefix: str = "") -> AsyncIterator[tuple[str, Any]]:
        """Changes under ``prefix`` as ``(key, value)``; value None means deleted.

        Events wait in a bounded queue (``max_queue``); overflow is counted in the booster's
        ``directory_events_dropped``.  The iteration ends when boxd goes away.
        """
        result = await self._session.request({"t": "dir_watch", "prefix": prefix})
        wid = result["watch"]
        queue: asyncio.Queue = asyncio.Queue(self.max_queue)
        self._queues[wid] = queue
        self._last_registered = max(self._last_registered, wid)
        for item in self._early.pop(wid, ()):
            queue.put_nowait(item)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._queues.pop(wid, None)
            if not self._session.closed:
                with contextlib.suppress(BoosterError, BoxdGone):
                    await self._session.request({"t": "dir_unwatch", "watch": wid})

    # called by the booster when boxd sends a dir_event / goes away
    def event(self, msg: dict) -> None:
        wid = msg["watch"]
        item = (msg["key"], None if msg["deleted"] else msg.get("value"))
        queue = self._queues.get(wid)
        if queue is None:
            if wid <= self._last_registered:
                return              # a watch that ended
            early = self._early.setdefault(wid, [])
            if len(early) < self.max_queue:
                early.append(item)
            else:
                self._stats["directory_events_dropped"] += 1
            return
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            self._stats["directory_events_dropped"] += 1

    def closed(self) -> None:
        for queue in self._queues.values():
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
