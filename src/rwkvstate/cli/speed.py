"""CPU threads, timed replies with a prompt progress bar, and the one-line speed summary that
`rwkvstate generate` and `chat` print on stderr (README, "Threads and speed").

Threads: torch's default (one per core) collapses when other processes compete for the cores,
because each operation waits for its slowest thread. Measured on a 2-core machine with the
bundled model and one busy process beside it, decode ran at 131 tokens/s with 1 thread and
15-33 tokens/s with 2; quiet, both gave ~111. So the default is half the usable cores.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Prompts longer than this get a progress bar (on a terminal): shorter ones read in well under a second.
PROGRESS_MIN_TOKENS = 2048


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else half the cores this process may run on, at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def configure_threads(requested: int | None) -> int:
    """Sets torch's intra-op threads (and one inter-op thread: inference has no parallel ops to
    overlap) before any model work starts; returns the thread count."""
    threads = requested or default_threads()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (a second main() call, the tests)
        pass
    return threads


@dataclass
class Timing:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generate_s: float = 0.0

    def summary(self) -> str:
        parts = []
        if self.prompt_tokens:
            parts.append(f"prompt {self.prompt_tokens} tokens, {_rate(self.prompt_tokens, self.prompt_s)}")
        parts.append(f"generated {self.generated_tokens} tokens, {_rate(self.generated_tokens, self.generate_s)}")
        return " | ".join(parts)


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tokens/s" if seconds > 0 and tokens else "- tokens/s"


def run_reply(stream, write: Callable[[str], object], stop: Callable[[], bool] = lambda: False,
              progress: bool | None = None) -> Timing:  # fmt: skip
    """Drives a GenerationStream to its end, writing each text piece; returns its timing.

    The prompt the stream was created with is read first, chunk by chunk (with a progress bar
    on a terminal when it is long). `stop()` is checked between engine steps: when it turns
    true the stream is closed, keeping every token fed so far."""
    timing = Timing(prompt_tokens=len(stream.pending))
    start = time.perf_counter()
    _read_prompt(stream, stop, sys.stderr.isatty() if progress is None else progress)
    timing.prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for piece in _until(stream, stop):
        write(piece)
    timing.generate_s = time.perf_counter() - start
    timing.generated_tokens = len(stream.token_ids)
    return timing


def _read_prompt(stream, stop, progress: bool) -> None:
    from tqdm import tqdm

    engine = stream.session.engine
    show = progress and len(stream.pending) >= PROGRESS_MIN_TOKENS
    with tqdm(total=len(stream.pending), desc="prompt", unit="tok", file=sys.stderr, disable=not show,
              leave=False, dynamic_ncols=True) as bar:  # fmt: skip
        while stream.pending and not stream.done:
            if stop():
                stream.close()
                return
            before = len(stream.pending)
            engine.step()
            bar.update(before - len(stream.pending))


def _until(stream, stop):
    """The stream's pieces until it ends or stop() turns true (then the stream is closed)."""
    engine = stream.session.engine
    while True:
        text = stream.read()
        if text:
            yield text
        if stream.done:
            return
        if stop():
            stream.close()
            return
        engine.step()
