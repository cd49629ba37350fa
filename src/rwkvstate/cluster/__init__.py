"""Past one machine: engine replicas on Ray Serve behind one ingress, sessions in Redis.

store.py: the shared session store (Redis); the engine core keeps its sessions in it through
runtime/shared.py, given the store as a factory (CoreConfig.shared_store). routing.py,
affinity.py: session affinity for Ray Serve. serve.py: the replicas, the ingress and
`rwkvstate serve --replicas N`. docs/cluster.md describes the design.
"""
