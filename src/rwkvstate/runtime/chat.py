"""The chat template of RWKV world models.

Turns are written as "User: <text>\n\nAssistant: <reply>\n\n". A blank line ends a
turn, so blank lines inside a message are folded to single newlines, and the
assistant's reply stops at the first blank line.
"""

from __future__ import annotations

import re

ASSISTANT_STOP = "\n\n"
_BLANK_LINES = re.compile(r"\n\s*\n")


def clean_message(text: str) -> str:
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()


def format_user_turn(text: str) -> str:
    """The text to feed for one user message, ending where the assistant's reply begins."""
    return f"User: {clean_message(text)}\n\nAssistant:"
