"""Chat messages -> prompt text, with the RWKV world-model template (runtime/chat.py).

    system    -> "System: {text}\n\n"
    user      -> "User: {text}\n\n"
    assistant -> "Assistant: {text}\n\n"
    and at the end "Assistant:", where the model's reply begins.

A blank line ends a turn, so blank lines inside a message are folded to single newlines
(chat.clean_message) and replies stop at the first blank line (chat.ASSISTANT_STOP). The
leading system messages come back separately so the worker can feed them as their own
prompt, which lets the prefix cache share their state between requests.
"""

from __future__ import annotations

from ..runtime.chat import ASSISTANT_STOP, clean_message

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
REPLY_START = "Assistant:"


def render_messages(messages) -> tuple[str, str]:
    """(system prefix, rest): the leading system messages, then the other turns plus REPLY_START.
    `messages` are (role, text) pairs."""
    turns = [f"{ROLE_NAMES[role]}: {clean_message(text)}{ASSISTANT_STOP}" for role, text in messages]
    n_system = 0
    while n_system < len(messages) and ROLE_NAMES[messages[n_system][0]] == "System":
        n_system += 1
    return "".join(turns[:n_system]), "".join(turns[n_system:]) + REPLY_START
