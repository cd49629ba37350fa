"""The events of one generation request, as the handlers see them (ServerContext.events)."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import APIError


@dataclass
class Text:
    text: str


@dataclass
class Done:
    finish_reason: str  # stop, length, timeout, cancelled, error
    prompt_tokens: int
    completion_tokens: int
    state: bytes | None = None  # the state file after the request, when it asked (return_state)


@dataclass
class Failed:
    error: APIError
