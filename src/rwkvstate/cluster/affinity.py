"""Which replica holds which session: shared by the ingress and its request router (routing.py).

A module of its own because Ray ships the router class by value into the ingress process:
the router reaches this module by reference, so both see the same map there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

MAX_REMEMBERED = 1 << 20  # sessions whose replica is remembered


class Affinity:
    """session id -> unique id of the replica that holds it; thread-safe (the router may run
    on its own event loop thread)."""

    def __init__(self, capacity: int = MAX_REMEMBERED):
        self.capacity = capacity
        self._map: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.replicas: list[str] = []  # unique ids of the replicas the router knows now
        self.hits = self.misses = 0  # requests routed to their session's replica / elsewhere

    def remember(self, session: str, replica: str) -> None:
        with self._lock:
            self._map[session] = replica
            self._map.move_to_end(session)
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)

    def lookup(self, session: str) -> str | None:
        with self._lock:
            return self._map.get(session)

    def forget_replica(self, replica: str) -> None:
        with self._lock:
            for session in [s for s, r in self._map.items() if r == replica]:
                del self._map[session]

    def load(self) -> dict[str, int]:
        """Sessions remembered per replica."""
        with self._lock:
            out: dict[str, int] = {}
            for replica in self._map.values():
                out[replica] = out.get(replica, 0) + 1
            return out


AFFINITY = Affinity()
