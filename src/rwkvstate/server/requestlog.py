"""One log line per generation request with its timings, and the start-up summary line.

A request's clock starts when the API process received it; the first Text event marks the first token
(time to first token covers queueing and prefill); Done or Failed ends it. Tokens per
second counts generated tokens over the time after the first one, the decode rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .events import Done, Failed, Text

log = logging.getLogger("rwkvstate.server")


@dataclass
class RequestTimer:
    """Timestamps of one request (time.monotonic())."""

    kind: str  # "chat" or "completion"
    session: str | None = None
    queued: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def on_event(self, event) -> None:
        """Feeds every event of the job; logs the line at Done or Failed."""
        now = time.monotonic()
        if isinstance(event, Text) and self.first_token is None:
            self.first_token = now
        elif isinstance(event, Done):
            log.info("%s", self.line(event, now))
        elif isinstance(event, Failed):
            log.info("%s failed after %.3f s: %s %s", self.kind, now - self.queued, event.error.status,
                     event.error.message)  # fmt: skip

    def line(self, done, now: float) -> str:
        total = now - self.queued
        ttft = (self.first_token - self.queued) if self.first_token is not None else None
        decode_s = (now - self.first_token) if self.first_token is not None else 0.0
        rate = (done.completion_tokens - 1) / decode_s if decode_s > 0 and done.completion_tokens > 1 else None
        parts = [
            f"{self.kind}{'' if self.session is None else f' session={self.session}'}",
            f"finish={done.finish_reason}",
            f"prompt_tokens={done.prompt_tokens}",
            f"generated_tokens={done.completion_tokens}",
            f"ttft={'-' if ttft is None else f'{ttft:.3f}s'}",
            f"total={total:.3f}s",
            f"tokens/s={'-' if rate is None else f'{rate:.1f}'}",
        ]
        return " ".join(parts)


def log_startup(summary: dict, config, names) -> None:
    """What is being served, on what, with how much: the first lines an operator reads.
    summary: the engine core's model_summary() (the model may live in another process)."""
    from ..state.layout import dtype_name

    log.info("model %s: RWKV-7, %d layers, n_embd %d, vocab %d (%s tokenizer); served as %s", summary["path"],
             summary["n_layer"], summary["n_embd"], summary["vocab_size"], summary["tokenizer"],
             ", ".join(names))  # fmt: skip
    log.info("device %s, %d slots, compute dtype %s, state dtype %s, prefix cache %d MiB, state dir %s",
             summary["device"], config.slots, summary["dtype"], dtype_name(config.state_dtype),
             config.prefix_cache_bytes >> 20, config.state_dir or "none")  # fmt: skip
