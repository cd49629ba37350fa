"""Prefix cache: states of token prefixes, so prompts that share a prefix compute it once.

A trie over token ids; a node may hold a snapshot of the state after its prefix (in
any snapshot format, on the pool's device) and the next-token logits there. A lookup
returns the longest cached prefix of a prompt; the caller restores it and feeds only
the rest. A byte budget bounds the snapshots; the least recently used ones are
evicted first; the trie's own nodes count against the budget too (an estimate per
node), so long prompts cannot grow host memory past it. Only states computed from the
zero state may enter: the key is the whole token history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .snapshot import Encoded

NODE_BYTES = 240  # host memory of one trie node (object, dict slot, entry in its parent), counted in the budget


@dataclass
class CacheEntry:
    state: Encoded
    logits: torch.Tensor | None
    length: int
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else self.logits.numel() * self.logits.element_size()
        return self.state.nbytes + extra


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    entry: CacheEntry | None = None
    parent: "_Node | None" = None
    token: int = -1


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0  # tokens not fed thanks to hits
    inserts: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prefix cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.root = _Node()
        self.nbytes = 0
        self.num_entries = 0
        self.stats = CacheStats()
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def lookup(self, tokens: Sequence[int], min_length: int = 1) -> CacheEntry | None:
        """The entry of the longest cached prefix of tokens that is at least min_length long."""
        self.stats.lookups += 1
        node, best = self.root, None
        for depth, token in enumerate(tokens, 1):
            child = node.children.get(token)
            if child is None:
                break
            node = child
            if node.entry is not None and depth >= min_length:
                best = node.entry
        if best is None:
            return None
        best.last_used = self._tick()
        self.stats.hits += 1
        self.stats.hit_tokens += best.length
        return best

    def contains(self, tokens: Sequence[int]) -> bool:
        node = self._walk(tokens)
        return node is not None and node.entry is not None

    def insert(self, tokens: Sequence[int], state: Encoded, logits: torch.Tensor | None) -> bool:
        """Stores a snapshot (owned by the cache from now on) of the state after tokens.
        Returns False when it cannot fit the budget at all."""
        entry = CacheEntry(state, logits, len(tokens), self._tick())
        if not tokens or entry.nbytes + NODE_BYTES * len(tokens) > self.max_bytes:
            return False
        node = self.root
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node(parent=node, token=token)
                self.nbytes += NODE_BYTES
            node = child
        if node.entry is not None:
            self._drop(node)
        node.entry = entry
        self.nbytes += entry.nbytes
        self.num_entries += 1
        self.stats.inserts += 1
        self._evict_to_budget(keep=node)
        return True

    def clear(self) -> None:
        self.root = _Node()
        self.nbytes = self.num_entries = 0

    def _walk(self, tokens):
        node = self.root
        for token in tokens:
            node = node.children.get(token)
            if node is None:
                return None
        return node

    def _evict_to_budget(self, keep: _Node) -> None:
        if self.nbytes <= self.max_bytes:
            return
        nodes = sorted(self._entry_nodes(), key=lambda n: n.entry.last_used)
        for node in nodes:
            if self.nbytes <= self.max_bytes:
                break
            if node is not keep:
                self._drop(node)
                self._prune(node)
                self.stats.evictions += 1

    def _entry_nodes(self):
        stack, out = [self.root], []
        while stack:
            node = stack.pop()
            if node.entry is not None:
                out.append(node)
            stack.extend(node.children.values())
        return out

    def _drop(self, node: _Node) -> None:
        assert node.entry is not None
        self.nbytes -= node.entry.nbytes
        self.num_entries -= 1
        node.entry = None

    def _prune(self, node: _Node) -> None:
        """Removes a branch's nodes that hold neither an entry nor children."""
        while node.parent is not None and node.entry is None and not node.children:
            del node.parent.children[node.token]
            self.nbytes -= NODE_BYTES
            node = node.parent
