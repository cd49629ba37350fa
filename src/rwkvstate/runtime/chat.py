"""The chat format of RWKV world models, for the CLI and the server alike.

    system    -> "System: {text}\n\n"
    user      -> "User: {text}\n\n"
    assistant -> "Assistant: {text}\n\n"
    and at the end "Assistant:", where the model's reply begins (with a space).

A blank line ends a turn, so blank lines inside a message are folded to single newlines and
the assistant's reply stops at the first blank line (ASSISTANT_STOP). A turn fed after text
that did not end its turn (a reply cut by max_tokens, say) starts after a blank line.
"""

from __future__ import annotations

import re
from typing import Sequence

ASSISTANT_STOP = "\n\n"
REPLY_START = "Assistant:"
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_BLANK_LINES = re.compile(r"\n\s*\n")


def clean_message(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()


def format_user_turn(text: str) -> str:
    """The text to feed for one user message, ending where the assistant's reply begins."""
    return f"User: {clean_message(text)}{ASSISTANT_STOP}{REPLY_START}"


def render_messages(messages: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(system prefix, rest) of (role, text) pairs: the leading system messages, then the other
    turns plus REPLY_START. The prefix comes back separately so it can be fed as a prompt of its
    own, which lets the prefix cache share its state between conversations."""
    turns = [f"{ROLE_NAMES[role]}: {clean_message(text)}{ASSISTANT_STOP}" for role, text in messages]
    n_system = 0
    while n_system < len(messages) and ROLE_NAMES[messages[n_system][0]] == "System":
        n_system += 1
    return "".join(turns[:n_system]), "".join(turns[n_system:]) + REPLY_START


def turn_break(previous: bytes | None) -> str:
    """What a new turn starts with after earlier text whose last bytes are `previous` (None: no
    earlier text): a blank line unless that text ended its turn."""
    return ASSISTANT_STOP if previous is not None and not previous.endswith(ASSISTANT_STOP.encode()) else ""


class ReplyText:
    """A reply's text as it streams: the space that follows REPLY_START is not part of it."""

    def __init__(self) -> None:
        self._started = False

    def push(self, piece: str) -> str:
        if not self._started and piece:
            self._started = True
            piece = piece[1:] if piece.startswith(" ") else piece
        return piece
