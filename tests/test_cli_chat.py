"""`rwkvstate chat` (multi-line input, --system, /save and /load, Ctrl-C, the base-model warning),
--threads, and the speed summary and prompt progress of `generate` and `chat`."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sys
import time

import pytest
import torch

import rwkvstate
from rwkvstate.cli import speed as cli_speed
from rwkvstate.cli import main
from rwkvstate.cli.chat import ChatConsole, base_model_warning
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint

from test_cli import BYTE_CFG, WORLD_CFG  # the CLI tests' tiny models

SUMMARY = "tokens/s"


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    return save_checkpoint(random_checkpoint(BYTE_CFG, seed=3), tmp_path_factory.mktemp("m") / "tiny.pth")


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    cp = random_checkpoint(WORLD_CFG, seed=4, dtype=torch.float16)
    return save_checkpoint(cp, tmp_path_factory.mktemp("w") / "world.safetensors")


@pytest.fixture(scope="module")
def loaded(byte_model):
    return rwkvstate.Model.load(byte_model)


def console(model, lines, monkeypatch, **kw) -> ChatConsole:
    """A chat console over a fresh session whose input() returns `lines`, then EOF."""
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    session = rwkvstate.Engine(model, slots=2).session()
    sampling = rwkvstate.SamplingParams(temperature=0)
    return ChatConsole(session, sampling, kw.pop("max_tokens", 4), **kw)


def text_of(c: ChatConsole) -> str:
    return c.session.engine.tokenizer.decode(c.session.tokens)


# ---- input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lines", [
    ["line one\\", "line two"],
    ['"""line one', 'line two"""'],
    ['"""', "line one", "line two", '"""'],
])  # fmt: skip
def test_multi_line_messages(monkeypatch, capsys, loaded, lines):
    c = console(loaded, lines, monkeypatch)
    assert c.run() == 0
    assert text_of(c).startswith("User: line one\nline two\n\nAssistant:")


def test_system_prompt_starts_the_chat_and_survives_reset(monkeypatch, capsys, loaded):
    c = console(loaded, ["hello", "/reset"], monkeypatch, system="Be brief.\n\nVery.")
    assert text_of(c) == "System: Be brief.\nVery.\n\n"  # a blank line would end the turn
    c.run()
    assert text_of(c) == "System: Be brief.\nVery.\n\n"
    assert "(conversation cleared)" in capsys.readouterr().err


def test_reply_cut_short_is_closed_before_the_next_turn(monkeypatch, capsys, loaded):
    """A reply that ended by its length limit leaves the state mid-turn: the next message
    starts with the blank line that ends a turn (as the server does)."""
    c = console(loaded, ["one", "two"], monkeypatch, max_tokens=3)
    c.run()
    raw = bytes(c.session.tokens)  # byte-level: one token per byte
    first = b"User: one\n\nAssistant:"
    assert raw.startswith(first)
    assert raw[len(first) + 3 :].startswith(b"\n\nUser: two\n\nAssistant:")  # after three sampled bytes


def test_undo_takes_back_a_retried_exchange_whole(monkeypatch, capsys, loaded):
    c = console(loaded, ["first", "second", "/retry", "/retry", "/undo", "/undo", "/undo"], monkeypatch)
    c.run()
    err = capsys.readouterr().err
    assert c.session.tokens == [] and err.count("(last exchange removed)") == 2 and "(nothing to undo)" in err


def test_save_and_load_inside_chat(monkeypatch, capsys, loaded, tmp_path):
    path = tmp_path / "chat.state"
    c = console(loaded, ["hello", f"/save {path}", "/reset", f"/load {path}", f"/save {path}",
                         f"/load {tmp_path / 'missing.state'}", "/save", "/bogus"], monkeypatch)  # fmt: skip
    c.run()
    err = capsys.readouterr().err
    saved = text_of(c)
    assert saved.startswith("User: hello\n\nAssistant:")
    assert f"(saved {len(c.session.tokens)} tokens to {path})" in err
    assert f"(loaded {path}: {len(c.session.tokens)} tokens)" in err
    assert "exists; /save will not overwrite it" in err  # the second /save
    assert "(error: " in err and "missing.state" in err  # a bad /load changes nothing
    assert "(error: /save needs a file name" in err and "(unknown command /bogus" in err
    assert "Traceback" not in err


def test_speed_summary_after_each_reply_and_quiet(monkeypatch, capsys, loaded):
    console(loaded, ["a", "b"], monkeypatch).run()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if SUMMARY in line]
    assert len(lines) == 2 and all(line.startswith("prompt ") and "| generated " in line for line in lines)
    console(loaded, ["a"], monkeypatch, quiet=True).run()
    assert SUMMARY not in capsys.readouterr().err


# ---- the base-model warning ------------------------------------------------------------------


def test_warning_for_byte_level_and_base_models(tmp_path, loaded, world_model):
    assert "not tuned for chat" in base_model_warning(loaded)
    world = rwkvstate.Model.load(world_model)
    assert base_model_warning(world) is None  # nothing says what it is
    copy = shutil.copy(world_model, tmp_path / "w.safetensors")
    (tmp_path / "w.json").write_text(json.dumps({"tokenizer": "world", "kind": "base, world, pile"}))
    assert "(base, world, pile) is not tuned for chat" in base_model_warning(rwkvstate.Model.load(copy))


def test_bundled_model_says_what_it_is():
    from rwkvstate.cli import BUNDLED_MODEL

    meta = json.loads(BUNDLED_MODEL.with_suffix(".json").read_text())
    assert "base" in meta["kind"] and "byte-level" in meta["kind"]


# ---- generate, threads, progress -------------------------------------------------------------


def test_generate_prints_a_speed_summary(capsys, byte_model):
    argv = ["generate", "--model", str(byte_model), "--prompt", "abc", "--max-tokens", "7", "--temperature", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.strip().startswith("prompt 3 tokens, ") and "generated 7 tokens, " in err
    assert main(argv + ["--quiet", "--threads", "1"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_out == out and quiet_err == ""


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cli_speed.default_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert cli_speed.default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
        assert cli_speed.configure_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_threads_is_a_usage_error(capsys, byte_model):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(byte_model), "--prompt", "x", "--threads", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_prompt_progress_bar_and_stop(monkeypatch, capsys, loaded):
    monkeypatch.setattr(cli_speed, "PROGRESS_MIN_TOKENS", 10)
    engine = rwkvstate.Engine(loaded, slots=1, max_prefill_chunk=8)
    session = engine.session()
    pieces = []
    stream = session.generate(5, rwkvstate.SamplingParams(temperature=0), prompt="x" * 40)
    timing = cli_speed.run_reply(stream, pieces.append, progress=True)
    err = capsys.readouterr().err
    assert "prompt:" in err and "/40 [" in err  # a bar for the 40 prompt tokens (tqdm throttles its updates)
    assert timing.prompt_tokens == 40 and timing.generated_tokens == 5 and len(session.tokens) == 45
    # stop() between steps closes the stream and keeps what was fed
    stream = session.generate(50, rwkvstate.SamplingParams(temperature=0), prompt="y" * 40)
    steps = iter(range(100))
    timing = cli_speed.run_reply(stream, pieces.append, stop=lambda: next(steps) >= 2, progress=False)
    assert stream.finish_reason == "cancelled" and len(session.tokens) == 45 + 16
    assert capsys.readouterr().err == ""  # no bar without progress


# ---- Ctrl-C through a terminal ---------------------------------------------------------------


def test_ctrl_c_stops_the_reply_and_keeps_the_chat(byte_model):
    import pexpect
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "rwkvstate.cli", "chat", "--model", str(byte_model),
                                           "--max-tokens", "1000000"], env=env, encoding="utf-8", timeout=60,
                          codec_errors="replace")  # fmt: skip
    try:
        child.expect_exact("User: ")
        child.sendline("tell me everything")
        child.expect_exact("Assistant:")
        time.sleep(1.0)  # random bytes: it would go on for a million tokens
        child.sendintr()
        child.expect_exact("(reply stopped; the chat goes on)")
        child.expect(r"generated \d+ tokens")
        child.expect_exact("User: ")
        child.sendline("/undo")
        child.expect_exact("(last exchange removed)")
        child.expect_exact("User: ")
        child.sendintr()  # Ctrl-C at the prompt ends the chat
        child.expect_exact("(chat ended)")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_through_a_pipe(byte_model, tmp_path):
    """Piped input: multi-line messages, /save, Ctrl-D at the end."""
    import subprocess

    script = 'first\\\nsecond\n"""\nthird\n"""\n/save ' + str(tmp_path / "s.state") + "\n"
    run = subprocess.run([sys.executable, "-m", "rwkvstate.cli", "chat", "--model", str(byte_model),
                          "--max-tokens", "3", "--temperature", "0"], input=script, capture_output=True,
                         text=True, timeout=120, errors="replace")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Assistant:") == 2 and run.stderr.count("| generated ") == 2
    assert (tmp_path / "s.state").exists() and "Traceback" not in run.stderr


def test_eval_state_progress_bars(capsys, loaded):
    from rwkvstate.evaluation import default_variants, evaluate_state_precision

    docs = [list(range(40, 52)), list(range(60, 72))]
    variants = default_variants()[:2]
    results, _ = evaluate_state_precision(loaded, docs, variants, prompt_len=6, gen_len=3, log=lambda _: None,
                                          progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "teacher-forced" in err and "/11 [" in err and f"greedy {variants[1].name}" in err
    evaluate_state_precision(loaded, docs, variants, prompt_len=6, gen_len=3, log=lambda _: None)
    assert capsys.readouterr().err == ""
