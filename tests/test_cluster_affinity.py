"""The ingress's session -> replica map (cluster/affinity.py): its per-replica counts, which the
router reads for every request it places by load, always equal a count over the map."""

from __future__ import annotations

import random

from rwkvstate.cluster.affinity import Affinity


def _counted(affinity: Affinity) -> dict[str, int]:
    out: dict[str, int] = {}
    for replica in affinity._map.values():
        out[replica] = out.get(replica, 0) + 1
    return out


def test_load_matches_the_map_through_moves_evictions_and_dead_replicas():
    rng = random.Random(7)
    affinity = Affinity(capacity=40)
    for step in range(5000):
        if rng.random() < 0.95:
            affinity.remember(f"sess_{rng.randrange(100)}", f"r{rng.randrange(4)}")
        else:
            affinity.forget_replica(f"r{rng.randrange(4)}")
        assert affinity.load() == _counted(affinity), step
        assert len(affinity._map) <= 40


def test_a_session_moved_to_another_replica_counts_there_only():
    affinity = Affinity()
    affinity.remember("sess_a", "r0")
    affinity.remember("sess_b", "r0")
    affinity.remember("sess_a", "r1")
    assert affinity.load() == {"r0": 1, "r1": 1} and affinity.lookup("sess_a") == "r1"
    affinity.forget_replica("r0")
    assert affinity.load() == {"r1": 1} and affinity.lookup("sess_b") is None


def test_totals_are_the_hits_and_moves_so_far():
    affinity = Affinity()
    assert affinity.totals() == {"hits": 0, "moves": 0}
    affinity.hits, affinity.misses = 5, 1
    assert affinity.totals() == {"hits": 5, "moves": 1}
