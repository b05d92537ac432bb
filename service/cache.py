"""Caches for mention encodings and link results: Redis, or an in-process LRU without it.

Keys carry the model fingerprint and index version (``mel:<model>:<index>:<kind>:<sha256>``),
so a new model or index never serves stale entries. A Redis that is down or slow never fails
a request: each call has a short socket timeout, an error opens a breaker that bypasses Redis
for ``redis_retry_s`` (counted as cache errors), and the next call after that tries again, so
the cache resumes by itself when Redis returns.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Cache(Protocol):
    backend: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class LruCache:
    """In-process LRU with TTL (the default when no Redis URL is configured)."""

    backend = "lru"

    def __init__(
        self,
        size: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size, self.ttl, self.clock = size, ttl_s, clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self.clock()
        out: list[bytes | None] = []
        for k in keys:
            hit = self._data.get(k)
            if hit is None or hit[0] < now:
                if hit is not None:
                    del self._data[k]
                out.append(None)
            else:
                self._data.move_to_end(k)
                out.append(hit[1])
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        expires = self.clock() + self.ttl
        for k, v in items:
            self._data[k] = (expires, v)
            self._data.move_to_end(k)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis with a breaker: errors and timeouts bypass it for a while, never fail a request."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: int,
        timeout_s: float,
        retry_s: float,
        on_error: Callable[[str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.url, self.ttl, self.retry_s = url, ttl_s, retry_s
        # One immediate retry on a broken connection: after a Redis restart the pooled
        # connections are dead and the retry takes a fresh one (bounded by the timeouts).
        self.client: Any = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            health_check_interval=0,
        )
        self.down_until = 0.0
        self.on_error = on_error or (lambda kind: None)
        # told True after every call Redis answered, False after every failure: the
        # mel_redis_up gauge follows real traffic, not only /readyz
        self.on_state = on_state or (lambda up: None)
        self._drop_pool = False

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def _fail(self, exc: BaseException) -> None:
        if self.available:
            logger.warning(
                "redis unavailable (%s: %s): bypassing the cache for %.1fs",
                type(exc).__name__,
                exc,
                self.retry_s,
            )
        self.down_until = time.monotonic() + self.retry_s
        self._drop_pool = True
        self.on_error(type(exc).__name__)
        self.on_state(False)

    async def _reset_if_needed(self) -> None:
        if self._drop_pool:  # connections from before an outage are dead: start afresh
            self._drop_pool = False
            try:
                await self.client.connection_pool.disconnect()
            except Exception:
                logger.debug("redis pool reset failed", exc_info=True)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys or not self.available:
            return [None] * len(keys)
        await self._reset_if_needed()
        try:
            values = list(await self.client.mget(list(keys)))
        except Exception as exc:  # any Redis failure is a miss, never a failed request
            self._fail(exc)
            return [None] * len(keys)
        self.on_state(True)
        return values

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items or not self.available:
            return
        await self._reset_if_needed()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for k, v in items:
                    pipe.set(k, v, ex=self.ttl)
                await pipe.execute()
        except Exception as exc:
            self._fail(exc)
            return
        self.on_state(True)

    async def ping(self) -> bool:
        await self._reset_if_needed()
        try:
            ok = bool(await self.client.ping())
        except Exception as exc:
            self._fail(exc)
            return False
        self.down_until = 0.0  # answered: stop bypassing it now, not after redis_retry_s
        self.on_state(ok)
        return ok

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:
            logger.debug("redis close failed", exc_info=True)


__all__ = ["Cache", "LruCache", "RedisCache"]
