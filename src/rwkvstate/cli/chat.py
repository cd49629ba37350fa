"""The interactive loop of `rwkvstate chat`: one session whose state carries the conversation.

Input: a line is one message; a line ending in a backslash continues on the next line; a
line starting with three double quotes opens a block that ends at a line ending with them.
Ctrl-C during a reply stops it and keeps the chat (the state keeps what was said); Ctrl-C at
the prompt, Ctrl-D, /quit or /exit ends the chat.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .speed import run_reply
from ..errors import RwkvStateError, first_line
from ..runtime.chat import ASSISTANT_STOP, format_user_turn, render_messages, turn_break

HELP = (
    "chat: type a message (end a line with \\ to continue it, or wrap lines in \"\"\" ... \"\"\"); "
    "/undo takes back the last exchange, /retry redoes the last reply, /reset clears the conversation, "
    "/save FILE and /load FILE keep a conversation's state, /help shows this; "
    "Ctrl-C stops a reply; /quit, Ctrl-D or Ctrl-C at the prompt leaves"
)
BLOCK = '"""'


def base_model_warning(model) -> str | None:
    """A warning when the model is known not to be tuned for chat: a byte-level model, or one
    whose sidecar describes it as a base model (its "kind")."""
    from ..model.checkpoint import read_sidecar

    kind = str(read_sidecar(model.path).get("kind", "")) if model.path is not None else ""
    if model.config.tokenizer != "bytes" and "base" not in kind.lower():
        return None
    return (
        f"warning: {Path(str(model.path)).name} ({kind or 'byte-level'}) is not tuned for chat: it continues "
        "text, so replies may be empty or off-topic; for a real chat pass --model with an instruction-tuned "
        "RWKV-7 world model (e.g. the rwkv7-g1 series)"
    )


class ChatConsole:
    """Reads messages and commands, runs replies, and keeps the positions where each exchange
    began so /undo takes back exactly one message and its reply (however often it was retried)."""

    def __init__(self, session, sampling, max_tokens: int, quiet: bool = False, system: str | None = None):
        self.session, self.sampling, self.max_tokens, self.quiet = session, sampling, max_tokens, quiet
        sampling.stop = (ASSISTANT_STOP,)
        if system:
            session.feed(render_messages([("system", system)])[0])
        self.start = session.snapshot()  # /reset returns here: --state and --system included
        self.exchanges: list[int] = []  # token positions where each exchange began
        self.last = None  # the last reply's stream, for /retry

    # ---- input ----------------------------------------------------------------------------
    def read_message(self) -> str:
        """One message: a line, lines joined by trailing backslashes, or a \"\"\" block."""
        line = input("User: ")
        if line.lstrip().startswith(BLOCK):
            return self._read_block(line.lstrip()[len(BLOCK) :])
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)

    def _read_block(self, first: str) -> str:
        lines = [first]
        while not lines[-1].rstrip().endswith(BLOCK):
            lines.append(input("... "))
        lines[-1] = lines[-1].rstrip()[: -len(BLOCK)]
        return "\n".join(lines)

    def run(self) -> int:
        print(HELP, file=sys.stderr)
        while True:
            try:
                message = self.read_message()
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print("\n(chat ended)", file=sys.stderr)
                return 0
            text = message.strip()
            if text in ("/quit", "/exit"):
                return 0
            try:
                self.handle(text)
            except (RwkvStateError, ValueError, OSError) as e:
                print(f"(error: {first_line(e)})", file=sys.stderr)

    def handle(self, text: str) -> None:
        command, _, arg = text.partition(" ")
        commands: dict[str, Callable[[str], None]] = {"/reset": self.reset, "/undo": self.undo, "/retry": self.retry, "/help": self.help,
                    "/save": self.save, "/load": self.load}  # fmt: skip
        if command in commands:
            commands[command](arg.strip())
        elif text.startswith("/") and " " not in text:
            print(f"(unknown command {text}; /help lists them)", file=sys.stderr)
        elif text:
            self.say(text)

    # ---- commands -------------------------------------------------------------------------
    def say(self, text: str) -> None:
        session = self.session
        tokens = session.tokens
        previous = session.engine.tokenizer.decode_bytes(tokens[-4:]) if tokens else None
        prompt = turn_break(previous) + format_user_turn(text)
        self.exchanges.append(len(session.tokens))
        self.reply(session.generate(max_tokens=self.max_tokens, sampling=self.sampling, prompt=prompt))

    def retry(self, _arg: str = "") -> None:
        if self.last is None:
            print("(nothing to retry)", file=sys.stderr)
            return
        self.reply(self.session.regenerate())

    def undo(self, _arg: str = "") -> None:
        if not self.exchanges:
            print("(nothing to undo)", file=sys.stderr)
            return
        self.session.rollback(len(self.session.tokens) - self.exchanges.pop())
        self.last = None
        print("(last exchange removed)", file=sys.stderr)

    def reset(self, _arg: str = "") -> None:
        self.session.restore(self.start)
        self.exchanges, self.last = [], None
        print("(conversation cleared)", file=sys.stderr)

    def save(self, arg: str) -> None:
        if not arg:
            raise ValueError("/save needs a file name: /save FILE")
        path = Path(arg).expanduser()
        if path.exists():
            raise ValueError(f"{arg} exists; /save will not overwrite it, choose another name")
        self.session.save(path)
        print(f"(saved {len(self.session.tokens)} tokens to {arg})", file=sys.stderr)

    def load(self, arg: str) -> None:
        if not arg:
            raise ValueError("/load needs a file name: /load FILE")
        self.session.load(Path(arg).expanduser())
        self.exchanges, self.last = [], None  # the loaded state has no undo points of this chat
        print(f"(loaded {arg}: {len(self.session.tokens)} tokens)", file=sys.stderr)

    def help(self, _arg: str = "") -> None:
        print(HELP, file=sys.stderr)

    # ---- replies --------------------------------------------------------------------------
    def reply(self, stream) -> None:
        self.last = stream
        out = sys.stdout
        out.write("Assistant:")
        out.flush()
        with _interrupt_flag() as interrupted:
            timing = run_reply(stream, lambda piece: (out.write(piece), out.flush()), stop=interrupted)
        out.write("\n\n")
        out.flush()
        if interrupted():
            print("(reply stopped; the chat goes on)", file=sys.stderr)
        elif not stream.text.strip():
            print("(empty reply: the model ended its turn at once)", file=sys.stderr)
        if not self.quiet:
            print(timing.summary(), file=sys.stderr)


@contextmanager
def _interrupt_flag():
    """While active, Ctrl-C (SIGINT) sets a flag instead of raising, so a reply stops between
    engine steps and never in the middle of a forward. Yields the flag's getter."""
    hits = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
        yield lambda: False
        return
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)
