"""The API process's client of the engine core (server/client.py) across a core restart, against
a hand-driven core socket: until the new core has answered, the engine counts as not running, so
no request is sent to it that its Welcome (a new incarnation ends what was in flight) would fail."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

zmq = pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from rwkvstate.runtime import messages as m  # noqa: E402
from rwkvstate.server.client import CoreClient  # noqa: E402
from rwkvstate.server.protocol import APIError  # noqa: E402


class Core:
    """A ROUTER socket standing in for the engine core; answers only when told to."""

    def __init__(self, address: str, incarnation: str):
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.incarnation = incarnation

    async def receive(self):
        client, payload = await asyncio.wait_for(self.socket.recv_multipart(), 10)
        return client, m.decode_to_core(payload)

    async def welcome(self) -> None:
        """Answers the next Hello (skipping pings)."""
        while True:
            client, msg = await self.receive()
            if isinstance(msg, m.Hello):
                await self.socket.send_multipart([client, m.encode(m.Welcome(self.incarnation, "model", 256, "bytes"))])
                return

    async def answer_call(self, value) -> None:
        while True:
            client, msg = await self.receive()
            if isinstance(msg, m.Call):
                await self.socket.send_multipart([client, m.encode(m.Result(msg.cid, value=value))])
                return

    def close(self) -> None:
        self.context.destroy(0)


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(60)
def test_after_a_reconnection_nothing_is_sent_before_the_new_core_answers():
    address = f"ipc://{os.path.join(tempfile.mkdtemp(prefix='rwkvstate-client-'), 'core.sock')}"

    async def scenario():
        old = Core(address, "first")
        client = CoreClient(address)
        start = asyncio.ensure_future(client.start(timeout=10))
        await old.welcome()
        await start
        assert client.alive
        old.close()  # the core dies
        await wait_until(lambda: not client.connected)
        assert not client.alive
        new = Core(address, "second")  # it restarts on the same address
        await wait_until(lambda: client.connected)
        assert not client.alive  # connected, but the new core has not said who it is
        with pytest.raises(APIError, match="not running"):
            await client.call("list")
        await new.welcome()
        await wait_until(lambda: client.alive)
        assert client.welcome.incarnation == "second"
        call = asyncio.ensure_future(client.call("list"))
        await new.answer_call(["a session"])
        assert await call == ["a session"]  # answered, not failed by the restart
        await client.stop()
        new.close()

    asyncio.run(scenario())
