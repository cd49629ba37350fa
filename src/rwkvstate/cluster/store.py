"""The shared session store: sessions as state files in Redis, visible to every replica.

One Redis hash per session (`<prefix>s:<id>`) holds the state file's bytes (state/files.py:
fingerprint, checksum, storage dtype fp32/fp16/bf16/int8, token log, logits) and a `version`
that every write bumps. A write names the version it read (`expected`); Redis refuses it if
another replica wrote in between (StoreConflict), so a stale copy never overwrites a newer one.

Bounds: an optional TTL (refreshed whenever a session is read, checked or written) and an
optional byte cap over all blobs; past the cap the least recently used sessions are evicted,
oldest first, never the one being written. Both are enforced inside one Lua script per write,
so several replicas keep one consistent count. A sorted set (`<prefix>lru`, id -> last use)
and a hash of sizes (`<prefix>sizes`) let the script find what to evict and notice what Redis
expired; `<prefix>stats` counts bytes, writes, evictions, expirations and refused blobs.

Every Redis failure (refused connection, timeout, a server gone mid-command) is a
StoreUnavailable: the server answers 503 and nothing that was acknowledged is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import StoreConflict, StoreFull, StoreUnavailable, first_line

STORE_FORMATS = ("fp32", "fp16", "bf16", "int8")
SWEEP_LIMIT = 64  # expired sessions forgotten per write, so one write stays cheap


__all__ = ["RedisStore", "StoreConfig", "StoreConflict", "StoreFull", "StoreUnavailable", "render_store_metrics"]


@dataclass
class StoreConfig:
    url: str = "redis://127.0.0.1:6379/0"
    ttl_s: int | None = 7 * 24 * 3600  # idle sessions expire after this; None: never
    max_bytes: int | None = None  # cap over all session blobs; None: Redis's own memory only
    format: str | None = None  # storage dtype of blobs (fp32/fp16/bf16/int8); None: the pool's
    prefix: str = "rwkvstate:"
    timeout_s: float = 5.0  # connect and command timeout
    holder: str = ""  # written with every session this process stores: a replica's id, for the routers

    def __post_init__(self):
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"the session store must be a redis:// URL, got {self.url!r}")
        if self.format is not None and self.format not in STORE_FORMATS:
            raise ValueError(f"store format must be one of {', '.join(STORE_FORMATS)}, got {self.format!r}")
        if self.ttl_s is not None and self.ttl_s < 1:
            raise ValueError(f"store TTL must be >= 1 second or None, got {self.ttl_s}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"store byte cap must be >= 1 or None, got {self.max_bytes}")


@dataclass
class Entry:
    version: int
    blob: bytes
    tokens: int
    created: int


# KEYS: session hash, lru zset, sizes hash, stats hash. ARGV: id, blob, expected version
# ("" = any), now, ttl (0 = none), cap (0 = none), tokens, created, session key prefix, holder.
_PUT = """
local function forget(id)
  local size = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HINCRBY', KEYS[4], 'bytes', 0 - size)
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= cur then return {-1, cur} end
local now, ttl, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local size = string.len(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local version = cur + 1
redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'version', version, 'tokens', ARGV[7], 'created', ARGV[8],
           'holder', ARGV[10])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('HINCRBY', KEYS[4], 'bytes', size - old)
redis.call('HINCRBY', KEYS[4], 'writes', 1)
if ttl > 0 then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, %d)) do
    if redis.call('EXISTS', ARGV[9] .. id) == 0 then
      forget(id)
      redis.call('HINCRBY', KEYS[4], 'expired', 1)
    end
  end
end
local evicted = 0
while cap > 0 and tonumber(redis.call('HGET', KEYS[4], 'bytes')) > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest or oldest == ARGV[1] then break end
  redis.call('DEL', ARGV[9] .. oldest)
  forget(oldest)
  evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', KEYS[4], 'evicted', evicted) end
return {version, evicted}
""" % SWEEP_LIMIT

# KEYS: session hash, lru zset. ARGV: id, now, ttl. Returns the version (0: no such session)
# and refreshes the session's TTL and last use.
_TOUCH = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return 0 end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return tonumber(v)
"""

# KEYS: session hash, lru zset, sizes hash, stats hash. ARGV: id. Returns 1 if it existed.
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'bytes', 0 - size)
return existed
"""


class RedisStore:
    """Session blobs in Redis. Methods block (a socket round trip); call them from a thread
    (the engine core's loop, or asyncio.to_thread on an event loop)."""

    def __init__(self, config: StoreConfig):
        import redis

        self.config = config
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._redis = redis.Redis.from_url(config.url, socket_timeout=config.timeout_s,
                                           socket_connect_timeout=config.timeout_s)  # fmt: skip
        p = config.prefix
        self._lru, self._sizes, self._stats, self._counts = p + "lru", p + "sizes", p + "stats", p + "counts"
        self._put = self._redis.register_script(_PUT)
        self._touch = self._redis.register_script(_TOUCH)
        self._delete = self._redis.register_script(_DELETE)

    @property
    def format(self) -> str | None:
        """The storage dtype of the blobs this store writes (None: the pool's)."""
        return self.config.format

    @property
    def where(self) -> str:
        """The store's address without credentials, for messages."""
        url = self.config.url
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def _key(self, session_id: str) -> str:
        return f"{self.config.prefix}s:{session_id}"

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise StoreUnavailable(f"the session store at {self.where} is unreachable ({type(e).__name__}: "
                                   f"{first_line(e, 'no answer')}); retry when it is back") from None  # fmt: skip

    # ---- sessions ------------------------------------------------------------------------------
    def put(self, session_id: str, blob: bytes, *, expected: int | None, tokens: int, created: int) -> int:
        """Writes a session's blob if the stored version is `expected` (0: the session must not
        exist yet; None: any); returns the new version."""
        c = self.config
        if c.max_bytes is not None and len(blob) > c.max_bytes:
            raise StoreFull(f"a session of {len(blob):,} bytes does not fit the store's cap of {c.max_bytes:,} bytes")
        args = [session_id, blob, "" if expected is None else expected, time.time(), c.ttl_s or 0, c.max_bytes or 0,
                tokens, created, self._key(""), c.holder]  # fmt: skip
        version, detail = self._call(self._put, keys=[self._key(session_id), self._lru, self._sizes, self._stats],
                                     args=args)  # fmt: skip
        if version < 0:
            raise StoreConflict(f"session {session_id} was changed by another replica (stored version {detail}, "
                                f"this copy is version {expected}); retry the request")  # fmt: skip
        return int(version)

    def version(self, session_id: str) -> int:
        """The stored version (0: no such session); refreshes its TTL and last use."""
        now = time.time()
        return int(self._call(self._touch, keys=[self._key(session_id), self._lru],
                              args=[session_id, now, self.config.ttl_s or 0]))  # fmt: skip

    def get(self, session_id: str) -> Entry | None:
        fields = self._call(self._redis.hmget, self._key(session_id), "version", "blob", "tokens", "created")
        if fields[0] is None or fields[1] is None:
            return None
        self.version(session_id)  # a read is a use: refresh TTL and LRU position
        return Entry(int(fields[0]), bytes(fields[1]), int(fields[2] or 0), int(fields[3] or 0))

    def holder(self, session_id: str) -> str | None:
        """Who wrote the session's stored version (StoreConfig.holder; None: no such session, or
        written by a process that names none). No TTL refresh: routers ask this per request."""
        value = self._call(self._redis.hget, self._key(session_id), "holder")
        return value.decode() if value else None

    def delete(self, session_id: str) -> bool:
        keys = [self._key(session_id), self._lru, self._sizes, self._stats]
        return bool(self._call(self._delete, keys=keys, args=[session_id]))

    def ids(self) -> list[str]:
        """Sessions in the store, most recently used first (expired ones may linger until a write sweeps them)."""
        return [m.decode() for m in self._call(self._redis.zrevrange, self._lru, 0, -1)]

    def infos(self, ids: list[str]) -> list[dict]:
        """{"id", "version", "tokens", "created", "bytes"} of each of `ids` still stored."""
        pipe = self._redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.hmget(self._key(session_id), "version", "tokens", "created")
            pipe.hget(self._sizes, session_id)
        rows = self._call(pipe.execute)
        out = []
        for session_id, fields, size in zip(ids, rows[::2], rows[1::2]):
            if fields[0] is not None:
                out.append({"id": session_id, "version": int(fields[0]), "tokens": int(fields[1] or 0),
                            "created": int(fields[2] or 0), "bytes": int(size or 0)})  # fmt: skip
        return out

    # ---- accounting ----------------------------------------------------------------------------
    def refused(self, session_id: str, reason: str) -> None:
        """Counts a blob that failed its checks (the caller reports it)."""
        try:
            self._redis.hincrby(self._stats, "refused", 1)
        except self._errors:
            pass

    def set_counts(self, name: str, totals: dict[str, int]) -> None:
        """Records `name`'s counter totals (an ingress's affinity hits and moves) beside the
        store's own; summed_counts() adds up every name's."""
        self._call(self._redis.hset, self._counts, mapping={f"{name}:{k}": v for k, v in totals.items()})

    def summed_counts(self, skip: str | None = None) -> dict[str, int]:
        """Each counter's total over every name that recorded it (but `skip`)."""
        out: dict[str, int] = {}
        for field, value in self._call(self._redis.hgetall, self._counts).items():
            name, _, key = field.decode().rpartition(":")
            if name != skip:
                out[key] = out.get(key, 0) + int(value)
        return out

    def stats(self) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._stats)
        pipe.zcard(self._lru)
        raw, sessions = self._call(pipe.execute)
        counts = {k.decode(): int(v) for k, v in raw.items()}
        keys = ("bytes", "writes", "evicted", "expired", "refused")
        return {"sessions": int(sessions), **{k: counts.get(k, 0) for k in keys}}

    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()


STORE_METRICS = (
    ("sessions", "gauge", "sessions in the shared store"),
    ("bytes", "gauge", "bytes of session state files in the shared store"),
    ("writes", "counter", "session writes to the shared store"),
    ("evicted", "counter", "sessions evicted from the shared store by its byte cap"),
    ("expired", "counter", "sessions expired from the shared store by its TTL"),
    ("refused", "counter", "stored session states refused on load (checksum, fingerprint, shape)"),
)


def render_store_metrics(store: RedisStore) -> str:
    """The store's counters in Prometheus text; an unreachable store reports store_up 0."""
    try:
        stats, up = store.stats(), 1
    except StoreUnavailable:
        stats, up = {}, 0
    lines = ["# HELP rwkvstate_store_up whether the shared session store answers", "# TYPE rwkvstate_store_up gauge",
             f"rwkvstate_store_up {up}"]  # fmt: skip
    for key, kind, text in STORE_METRICS if up else ():
        name = f"rwkvstate_store_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
    return "\n".join(lines) + "\n"
