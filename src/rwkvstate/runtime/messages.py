"""Messages between the engine core and API server processes (msgpack, through msgspec).

API -> core: Hello, Ping, Generate, Cancel, StopAt, Call.
Core -> API: Welcome, Pong, Steps (one per engine step and API process: every stream's new
token ids and, when it ended, its finish reason and usage, or its error), Result.

Every message is a tagged struct, so one decoder reads any of them. Updates are encoded as
arrays (no field names on the wire): a step message for 256 streams stays a few kilobytes.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec


class Hello(msgspec.Struct, tag=True):
    """An API process connects (or reconnects after the core restarted)."""


class Welcome(msgspec.Struct, tag=True):
    incarnation: str  # changes when the core restarts: requests in flight before it are gone
    model_name: str
    vocab_size: int
    tokenizer: str  # "world" or "bytes"
    stats: dict = {}


class Ping(msgspec.Struct, tag=True):
    """A heartbeat; the Pong carries the engine's latest stats."""


class Pong(msgspec.Struct, tag=True):
    incarnation: str
    stats: dict


class Generate(msgspec.Struct, tag=True):
    rid: int  # the request's id, unique within its API process
    prompt: Union[str, list[int]]
    max_tokens: int
    sampling: dict  # SamplingParams fields
    prefix: str = ""  # a system prompt the prefix cache may share
    chat: bool = False  # a chat turn: starts after a blank line if earlier text did not end in one
    session: Union[str, None] = None  # a named session to continue
    timeout_s: Union[float, None] = None  # from arrival to the last token
    state: Union[bytes, None] = None  # stateless mode: a one-off session starts from this state file
    return_state: bool = False  # the last update carries the state file after the request
    arrived: Union[float, None] = None  # time.monotonic() when the API process received it (same host only)


class Cancel(msgspec.Struct, tag=True):
    rid: int
    reason: str = "cancelled"


class StopAt(msgspec.Struct, tag=True):
    """The API side found a stop string completed by the stream's n-th token."""

    rid: int
    tokens: int


class Call(msgspec.Struct, tag=True):
    """A session operation (create, list, get, delete, fork, rollback, snapshot)."""

    cid: int
    op: str
    args: dict = {}


class Error(msgspec.Struct, array_like=True):
    status: int
    message: str
    param: Union[str, None] = None
    code: Union[str, None] = None


class Update(msgspec.Struct, array_like=True):
    """One stream in one step: new token ids; at its end the finish reason and usage, or an error."""

    rid: int
    ids: list[int]
    finish: Union[str, None] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Union[Error, None] = None
    state: Union[bytes, None] = None  # the state file after the request, when it asked (return_state)


class Steps(msgspec.Struct, tag=True):
    updates: list[Update]
    stats: Union[dict, None] = None  # fresh engine stats when a request ended in this step


class Result(msgspec.Struct, tag=True):
    cid: int
    value: Any = None
    error: Union[Error, None] = None
    stats: Union[dict, None] = None  # the engine stats after the operation


ToCore = Union[Hello, Ping, Generate, Cancel, StopAt, Call]
FromCore = Union[Welcome, Pong, Steps, Result]

encode = msgspec.msgpack.Encoder().encode
_to_core: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ToCore)
_from_core: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(FromCore)


def decode_to_core(data: bytes) -> Any:
    """A message an API process sent (one of ToCore)."""
    return _to_core.decode(data)


def decode_from_core(data: bytes) -> Any:
    """A message the core sent (one of FromCore)."""
    return _from_core.decode(data)
