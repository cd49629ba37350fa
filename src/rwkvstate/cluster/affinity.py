"""Which replica holds which session: shared by the ingress and its request router (routing.py).

A module of its own because Ray ships the router class by value into the ingress process:
the router reaches this module by reference, so both see the same map there.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict

MAX_REMEMBERED = 1 << 20  # sessions whose replica is remembered


class Affinity:
    """session id -> unique id of the replica that holds it; thread-safe (the router may run
    on its own event loop thread)."""

    def __init__(self, capacity: int = MAX_REMEMBERED):
        self.capacity = capacity
        self._map: OrderedDict[str, str] = OrderedDict()
        # sessions per replica, kept with the map: the router reads it for every request it places
        # by load, which must not scan up to MAX_REMEMBERED entries each time
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.replicas: list[str] = []  # unique ids of the replicas the router knows now
        self.hits = self.misses = 0  # requests routed to their session's replica / elsewhere

    def remember(self, session: str, replica: str) -> None:
        with self._lock:
            old = self._map.get(session)
            if old is not None:
                self._drop(old)
            self._map[session] = replica
            self._map.move_to_end(session)
            self._held[replica] += 1
            while len(self._map) > self.capacity:
                self._drop(self._map.popitem(last=False)[1])

    def lookup(self, session: str) -> str | None:
        with self._lock:
            return self._map.get(session)

    def forget_replica(self, replica: str) -> None:
        with self._lock:
            for session in [s for s, r in self._map.items() if r == replica]:
                del self._map[session]
            self._held.pop(replica, None)
            self.replicas = [r for r in self.replicas if r != replica]

    def load(self) -> dict[str, int]:
        """Sessions remembered per replica."""
        with self._lock:
            return dict(self._held)

    def totals(self) -> dict[str, int]:
        """This router's hits and moves so far."""
        return {"hits": self.hits, "moves": self.misses}

    def _drop(self, replica: str) -> None:
        """One session less on `replica` (the lock is held)."""
        self._held[replica] -= 1
        if not self._held[replica]:
            del self._held[replica]


AFFINITY = Affinity()
