"""Property test: random sequences of state operations against a model of each session's tokens.

Every session's logits and whole state (att_shift, wkv, ffn_shift) must always equal a fresh
run of its token log, whatever happened
in between: feeds, forks, snapshots and restores (canonical and encoded), rollbacks, undo,
evictions to the host tier, and state-file round trips.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from conftest import STATE_PARTS, assert_same_run, fresh_run
from rwkvstate import Engine, Model
from rwkvstate.model.synthetic import random_checkpoint, tiny_config

VOCAB = 61
CFG = tiny_config(n_layer=1, n_embd=32, head_size=16, ffn_dim=64, vocab_size=VOCAB)
MODEL = Model.from_tensors(random_checkpoint(CFG, seed=3), CFG)
TOL = 1e-5

token_lists = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9)


class Lifecycle(RuleBasedStateMachine):
    sessions = Bundle("sessions")
    snapshots = Bundle("snapshots")

    @initialize()
    def start(self):
        self.engine = Engine(MODEL, slots=2, history_every=4, history_capacity=2, prefix_cache_bytes=40_000,
                             prefix_cache_every=4)  # fmt: skip
        self.tokens: dict[int, list[int]] = {}  # session id -> expected token log
        self.dir = Path(tempfile.mkdtemp())
        self.touched = None

    def _check(self, session):
        assert session.tokens == self.tokens[session.id]
        self.touched = session

    @rule(target=sessions)
    def new_session(self):
        s = self.engine.session()
        self.tokens[s.id] = []
        return s

    @rule(s=sessions, ids=token_lists)
    def feed(self, s, ids):
        s.feed(ids)
        self.tokens[s.id] += ids
        self._check(s)

    @rule(target=sessions, s=sessions)
    def fork(self, s):
        child = s.fork()
        self.tokens[child.id] = list(self.tokens[s.id])
        self._check(child)
        return child

    @rule(target=snapshots, s=sessions, fmt=st.sampled_from([None, "fp32"]))
    def snapshot(self, s, fmt):
        return s.snapshot(fmt)

    @rule(s=sessions, snap=snapshots)
    def restore(self, s, snap):
        s.restore(snap)
        self.tokens[s.id] = list(snap.tokens)
        self._check(s)

    @rule(s=sessions, data=st.data())
    def rollback(self, s, data):
        n = data.draw(st.integers(0, len(self.tokens[s.id])))
        s.rollback(n)
        self.tokens[s.id] = self.tokens[s.id][: len(self.tokens[s.id]) - n]
        self._check(s)

    @rule(s=sessions)
    def undo(self, s):
        if s.undo_points:
            removed = s.undo()
            self.tokens[s.id] = self.tokens[s.id][: len(self.tokens[s.id]) - removed]
            self._check(s)

    @rule(s=sessions)
    def evict(self, s):
        if s.is_resident:
            self.engine.residency.evict(s)
            self._check(s)

    @rule(s=sessions, other=sessions)
    def save_and_load(self, s, other):
        path = self.dir / "state.safetensors"
        s.save(path)
        other.load(path)
        self.tokens[other.id] = list(self.tokens[s.id])
        self._check(other)

    @invariant()
    def touched_session_equals_a_fresh_run(self):
        s, self.touched = self.touched, None
        if s is None:
            return
        state = s.snapshot().state
        if s.tokens:
            assert_same_run(s.logits, state, *fresh_run(MODEL, s.tokens), TOL)
        else:
            assert all(state[k].abs().max() == 0 for k in STATE_PARTS)


Lifecycle.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
)
test_lifecycle_properties = Lifecycle.TestCase


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
