"""Session affinity for Ray Serve: a request router for the engine replicas.

The ingress passes each request's session id (`session=`) to the replica handle; this router
sends it to the replica that wrote the session last, where its state is already in the
pool, and a request without a known session to the least-loaded replica (Ray's queue-length
probes pick the shortest queue among the candidates). When the replica that held a session
has died, or its queue is full, the session goes to another one, which loads it from the
shared store. A request may also name its replica outright (`replica=`, a replica's
unique id): the ingress uses that to gather every replica's metrics.

The router runs inside each ingress process, next to its deployment handle. Where a session
is comes first from the store: every replica writes its id beside each session it stores
(`holder`), and the ingress reads it before handing the request over (`holder=`, so this
router itself never waits on Redis); with several ingresses a session created or moved
through one is found by the others. The local map (affinity.py: bounded, least recently used
forgotten first) keeps what this router learnt, from where it routed requests and from
sessions created or forked through its ingress; it answers when the store did not (slow or
unreachable: the replica will then report the store).
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import affinity  # by reference (see affinity.py); never `from .affinity import AFFINITY`


class SessionAffinityRouter(RequestRouter):
    # No FIFOMixin: it hands the replica chosen for one request to the oldest pending request,
    # which may be another session's; the base class matches the exact request it chose for.
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        affinity.AFFINITY.replicas = [r.replica_id.unique_id for r in candidate_replicas]
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        named = kwargs.get("replica")
        if named is not None:
            return [[by_id[named]]] if named in by_id else []
        session, holder = kwargs.get("session"), kwargs.get("holder")
        if session and holder in by_id:  # a holder that died since stays out of the map
            affinity.AFFINITY.remember(session, holder)
        home = by_id.get(affinity.AFFINITY.lookup(session) or "") if session else None
        if home is not None:
            others = [r for r in candidate_replicas if r is not home]
            return [[home], others] if others else [[home]]
        # least loaded: Ray picks the shortest queue among these; sessions held break ties
        held = affinity.AFFINITY.load()
        ranked = sorted(candidate_replicas, key=lambda r: (held.get(r.replica_id.unique_id, 0), random.random()))
        return [ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        session = pending_request.kwargs.get("session")
        if not session:
            return
        home = affinity.AFFINITY.lookup(session)
        if home == replica_id.unique_id:
            affinity.AFFINITY.hits += 1
        else:
            affinity.AFFINITY.misses += home is not None
            affinity.AFFINITY.remember(session, replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        # the ingress's /metrics asks each replica the router knows by id: a replica that died and
        # was replaced must leave that list now, not at this router's next request (an ingress
        # may route nothing for a while), or the metrics call would wait for it
        super().update_replicas(replicas)
        affinity.AFFINITY.replicas = [r.replica_id.unique_id for r in replicas]

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        affinity.AFFINITY.forget_replica(replica_id.unique_id)

