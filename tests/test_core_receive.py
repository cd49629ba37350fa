"""The engine core's receive budget: while streams generate, an iteration handles messages for at
most RECEIVE_BUDGET_S and leaves the rest in the socket, so a burst of requests is admitted over
several steps; every request is still answered, with the tokens it gets alone."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

zmq = pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from rwkvstate.cli.models import BUNDLED_MODEL  # noqa: E402
from rwkvstate.model.rwkv7 import Model  # noqa: E402
from rwkvstate.runtime import core as core_module  # noqa: E402
from rwkvstate.runtime import messages as m  # noqa: E402
from rwkvstate.runtime.core import CoreConfig, EngineCore  # noqa: E402

GREEDY = {"temperature": 0.0, "stop_token_ids": []}


@pytest.fixture(scope="module")
def model():
    return Model.load(BUNDLED_MODEL)


def drive(model, budget: float, monkeypatch, burst: int = 4):
    """A core with one long request running, then `burst` more sent at once; returns how many
    requests it had taken after each iteration, and every request's ids."""
    monkeypatch.setattr(core_module, "RECEIVE_BUDGET_S", budget)
    address = f"ipc://{tempfile.mkdtemp()}/core"
    core = EngineCore(model, CoreConfig(slots=8, prefix_cache_bytes=0), address)
    dealer = core.context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    try:
        dealer.send(m.encode(m.Generate(0, "def main():", 40, GREEDY)))
        while not core.jobs:
            core._iteration()
        for rid in range(1, burst + 1):
            dealer.send(m.encode(m.Generate(rid, f"x = {rid}\n", 6, GREEDY)))
        time.sleep(0.2)  # all of them wait in the core's socket
        taken, ids = [], {rid: [] for rid in range(burst + 1)}
        done: set[int] = set()
        while len(done) < burst + 1:
            core._iteration()
            taken.append(len(core.jobs) + len(done))
            while dealer.poll(0):
                for update in m.decode_from_core(dealer.recv()).updates:
                    assert update.error is None
                    ids[update.rid] += update.ids
                    if update.finish is not None:
                        done.add(update.rid)
        return taken, ids
    finally:
        dealer.close()
        core.socket.close()
        core.context.term()
        os.unlink(address[len("ipc://") :])


def test_a_burst_is_admitted_over_several_iterations_with_the_same_tokens(model, monkeypatch):
    spread, ids = drive(model, 0.0, monkeypatch)  # no budget: one message per iteration
    assert spread[:4] == [2, 3, 4, 5]
    whole, alone = drive(model, 10.0, monkeypatch)  # budget enough for the burst
    assert whole[0] == 5
    assert ids == alone and all(len(v) == (40 if rid == 0 else 6) for rid, v in ids.items())
