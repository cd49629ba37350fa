"""The API process's per-token path: updates that queued up behind a slow reader are written as
one piece, and a text chunk's SSE bytes are exactly the JSON chunk they stand for."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from rwkvstate.runtime import messages as m  # noqa: E402
from rwkvstate.runtime.sampling import SamplingParams  # noqa: E402
from rwkvstate.runtime.text import StopText  # noqa: E402
from rwkvstate.server import ServerConfig  # noqa: E402
from rwkvstate.server.app import Reply, _sse_data  # noqa: E402
from rwkvstate.server.context import Done, Failed, Job, ServerContext, Text  # noqa: E402
from rwkvstate.server.requestlog import RequestTimer  # noqa: E402
from rwkvstate.tokenizer import get_tokenizer  # noqa: E402


def _job(ctx: ServerContext, updates: list[m.Update], stops: tuple[str, ...] = ()) -> Job:
    job = Job(prompt="x", max_tokens=16, sampling=SamplingParams(stop=stops))
    job.text = StopText(get_tokenizer("bytes"), stops)
    job.timer = RequestTimer("completion")
    job.events = asyncio.Queue()
    for update in updates:
        job.events.put_nowait(update)
    ctx.inflight += 1
    return job


async def _events(updates: list[m.Update], stops: tuple[str, ...] = ()) -> tuple[list[list[object]], list[object]]:
    """The batches of events `ServerContext.events` yields for updates already queued (one batch
    per wakeup of the reader), and what was sent back to the core."""
    ctx = ServerContext(None, ServerConfig(core_address="ipc:///nonexistent/core.sock"))
    sent: list[object] = []
    ctx.client._send = sent.append  # type: ignore[method-assign]
    job = _job(ctx, updates, stops)
    ctx.client._requests[job.rid] = job.events
    batches: list[list[object]] = []
    try:
        while not job.ended:
            batches.append(ctx._coalesce(job, await job.events.get()))
    finally:
        ctx.client.context.destroy(0)
    return batches, sent


def _ids(text: str) -> list[int]:
    return list(text.encode())


def test_updates_queued_behind_a_slow_reader_become_one_text_event():
    updates = [m.Update(0, _ids("ab")), m.Update(0, _ids("c")), m.Update(0, _ids("de"), "length", 3, 5)]
    batches, _ = asyncio.run(_events(updates))
    assert len(batches) == 1  # one wakeup for all three step messages
    (text, done), = [batches[0]]
    assert isinstance(text, Text) and text.text == "abcde"
    assert isinstance(done, Done) and (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", 3, 5)


def test_coalesced_text_stops_at_a_stop_string_and_tells_the_core_once():
    updates = [m.Update(0, _ids("ab")), m.Update(0, _ids("cX")), m.Update(0, _ids("Yz")), m.Update(0, [], "stop", 1, 4)]
    batches, sent = asyncio.run(_events(updates, stops=("XY",)))
    texts = [e.text for batch in batches for e in batch if isinstance(e, Text)]
    assert "".join(texts) == "abc" and isinstance(batches[-1][-1], Done)
    assert [(s.rid, s.tokens) for s in sent if isinstance(s, m.StopAt)] == [(0, 5)]


def test_an_error_after_text_comes_last():
    error = m.Error(500, "boom", code="generation_failed")
    batches, _ = asyncio.run(_events([m.Update(0, _ids("hi")), m.Update(0, [], error=error)]))
    events = [e for batch in batches for e in batch]
    assert isinstance(events[0], Text) and events[0].text == "hi"
    assert isinstance(events[-1], Failed) and events[-1].error.status == 500 and len(events) == 2


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("session", [None, "s1"])
def test_text_event_bytes_equal_the_chunk_json(chat, session):
    reply = Reply(chat, 'model "x" é', session)
    for text in ["a", '"quoted"\\\n', "é€😀", "@", ""]:
        event = reply.text_event(text)
        assert event == _sse_data(reply.chunk(text=text))
        assert json.loads(event[len(b"data: ") :])["id"] == reply.id
