"""Tests for the `rwkvstate` command line (rwkvstate.cli.main), on tiny random models."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkvstate.cli
from rwkvstate.cli import main
from rwkvstate.errors import CheckpointError
from rwkvstate.model.rwkv7 import Model
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint, tiny_config
from rwkvstate.tokenizer import ByteTokenizer

# Byte-level: every size distinct. State: 2 * (32 + 2) * 64 = 4352 elements.
BYTE_CFG = tiny_config(
    n_layer=2, n_embd=64, head_size=32, vocab_size=256, ffn_dim=160,
    decay_rank=8, aaa_rank=12, mv_rank=4, gate_rank=20, tokenizer="bytes",
)  # fmt: skip
# World vocabulary, still small: 65536 x 64 embedding and head, fp16 on disk (~17 MB).
WORLD_CFG = tiny_config(
    n_layer=1, n_embd=64, head_size=32, vocab_size=65536, ffn_dim=128,
    decay_rank=8, aaa_rank=12, mv_rank=1, gate_rank=16, tokenizer="world",
)  # fmt: skip
ERROR_PREFIX = "rwkvstate: error: "


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("RWKVSTATE_DEBUG", raising=False)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byte_model")
    return save_checkpoint(random_checkpoint(BYTE_CFG, seed=3), root / "tiny.pth")


@pytest.fixture(scope="module")
def world_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world_model")
    return save_checkpoint(random_checkpoint(WORLD_CFG, seed=4, dtype=torch.float16), root / "world.safetensors")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str, fragment: str) -> str:
    """Exit 1, one line on stderr starting with the error prefix, no traceback."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def parse_inspect(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


# ---- inspect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_inspect(capsys, byte_model, dtype):
    rc, out, err = run(capsys, "inspect", "--model", byte_model, "--dtype", dtype)
    assert rc == 0, err
    rows = parse_inspect(out)
    L, C, N = BYTE_CFG.n_layer, BYTE_CFG.n_embd, BYTE_CFG.head_size
    n_params = sum(t.numel() for t in random_checkpoint(BYTE_CFG).values())
    state_numel = L * (N + 2) * C
    assert state_numel == 4352
    assert rows["file"] == str(byte_model)
    assert rows["layers"] == "2"
    assert rows["n_embd"] == "64"
    assert rows["head_size"] == "32"
    assert rows["heads"] == "2"
    assert rows["vocab"] == "256"
    assert rows["tokenizer"] == "bytes"
    assert rows["ffn_dim"] == "160"
    assert rows["lora ranks (decay, iclr, value, gate)"] == "8, 12, 4, 20"
    assert rows["parameters"] == f"{n_params:,}"
    assert rows["state elements per sequence"] == f"{state_numel:,}"
    assert rows["state bytes per sequence (fp32)"] == f"{state_numel * 4:,}" == "17,408"
    assert rows["state bytes per sequence (fp16)"] == f"{state_numel * 2:,}" == "8,704"
    assert rows["state bytes per sequence (bf16)"] == f"{state_numel * 2:,}"


def test_inspect_world_model(capsys, world_model):
    rc, out, err = run(capsys, "inspect", "--model", world_model)
    assert rc == 0, err
    rows = parse_inspect(out)
    assert (rows["layers"], rows["vocab"], rows["tokenizer"]) == ("1", "65536", "world")
    assert rows["state bytes per sequence (fp32)"] == f"{1 * 34 * 64 * 4:,}"


def test_inspect_tokenizer_override(capsys, world_model):
    rc, out, _ = run(capsys, "inspect", "--model", world_model, "--tokenizer", "world")
    assert rc == 0
    assert parse_inspect(out)["tokenizer"] == "world"


@pytest.mark.parametrize("command", [["inspect"], ["generate", "--prompt", "hello"]])
def test_a_tokenizer_that_does_not_fit_the_model_is_refused_naming_the_flag(capsys, byte_model, world_model, command):
    rc, out, err = run(capsys, *command, "--model", byte_model, "--tokenizer", "world")
    assert_clean_error(rc, err, "--tokenizer world has 65536 token ids, but a byte-level model has a vocabulary of 256")
    rc, out, err = run(capsys, *command, "--model", world_model, "--tokenizer", "bytes")
    assert_clean_error(rc, err, "--tokenizer bytes has 256 token ids, but a world-vocabulary model has a vocabulary")
    assert out == ""


# ---- generate --------------------------------------------------------------------------------


def greedy_reference(path: Path, prompt: str, n: int) -> str:
    """The text greedy decoding must produce, computed straight from Model.forward."""
    model = Model.load(path)
    pool = model.new_pool(slots=1)
    tok = ByteTokenizer()
    logits = model.forward(pool, [0], [tok.encode(prompt)])[0]
    ids = []
    for _ in range(n):
        ids.append(int(logits.argmax()))
        logits = model.forward(pool, [0], [[ids[-1]]])[0]
    return tok.decode(ids)


def test_generate_greedy_is_deterministic_and_correct(capsys, byte_model):
    argv = ["generate", "--model", byte_model, "--prompt", "Hello, world", "--max-tokens", 20, "--seed", 1]
    argv += ["--temperature", 0]
    rc1, out1, err1 = run(capsys, *argv)
    rc2, out2, err2 = run(capsys, *argv)
    assert rc1 == rc2 == 0, err1 + err2
    assert out1 == out2
    assert out1.startswith("Hello, world") and out1.endswith("\n")
    continuation = out1[len("Hello, world") : -1]
    assert continuation  # 20 random bytes, some possibly shown as U+FFFD
    assert continuation == greedy_reference(byte_model, "Hello, world", 20)


def test_generate_sampling_is_reproducible_with_a_seed(capsys, byte_model):
    argv = ["generate", "--model", byte_model, "--prompt", "abc", "--max-tokens", 12, "--seed", 7]
    _, out1, _ = run(capsys, *argv)
    _, out2, _ = run(capsys, *argv)
    assert out1 == out2 and out1.startswith("abc")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_generate_low_precision(capsys, byte_model, dtype):
    rc, out, err = run(
        capsys, "generate", "--model", byte_model, "--prompt", "x", "--max-tokens", 5, "--temperature", 0,
        "--dtype", dtype, "--state-dtype", dtype,
    )  # fmt: skip
    assert rc == 0, err
    assert out.startswith("x") and out.endswith("\n")


# ---- --help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["inspect"]])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rwkvstate {' '.join(command)}".rstrip())
    if command:
        assert "--model" in out and "--dtype" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: rwkvstate" in capsys.readouterr().err


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_missing_model_file(capsys, tmp_path, command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    rc, out, err = run(capsys, command, "--model", tmp_path / "missing.pth", *extra)
    assert_clean_error(rc, err, "model file not found: ")
    assert "missing.pth" in err and out == ""


def test_truncated_model(capsys, tmp_path, byte_model):
    data = byte_model.read_bytes()
    p = tmp_path / "cut.pth"
    p.write_bytes(data[: len(data) // 2])
    rc, out, err = run(capsys, "generate", "--model", p, "--prompt", "hi")
    assert_clean_error(rc, err, "cut.pth is not a PyTorch checkpoint (no zip archive found")
    assert out == ""


def test_truncated_safetensors_model(capsys, tmp_path, world_model):
    p = tmp_path / "cut.safetensors"
    with open(world_model, "rb") as f:
        p.write_bytes(f.read(4096))
    rc, _, err = run(capsys, "inspect", "--model", p)
    assert_clean_error(rc, err, "cut.safetensors is not a readable safetensors file (truncated or corrupt?)")


def test_bad_dtype(capsys, byte_model):
    rc, out, err = run(capsys, "generate", "--model", byte_model, "--prompt", "hi", "--dtype", "fp8")
    assert_clean_error(rc, err, "unknown dtype 'fp8'; use one of fp32, fp16, bf16")
    assert out == ""


def test_bad_state_dtype(capsys, byte_model):
    rc, _, err = run(capsys, "generate", "--model", byte_model, "--prompt", "hi", "--state-dtype", "int8")
    assert_clean_error(rc, err, "unknown dtype 'int8'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, byte_model):
    rc, out, err = run(capsys, "inspect", "--model", byte_model, "--device", "cuda")
    assert_clean_error(rc, err, "device 'cuda' was asked for, but this torch build sees no CUDA device")
    assert out == ""


def test_unknown_device(capsys, byte_model):
    rc, _, err = run(capsys, "inspect", "--model", byte_model, "--device", "gpu0")
    assert_clean_error(rc, err, "gpu0")


def test_negative_max_tokens_is_rejected_before_any_output(capsys, byte_model):
    for value in ("-1", "0", "ten"):
        with pytest.raises(SystemExit) as exc:
            rwkvstate.cli.main(["generate", "--model", str(byte_model), "--prompt", "hi", "--max-tokens", value])
        assert exc.value.code == 2  # argparse's usage error, before anything is loaded
        out, err = capsys.readouterr()
        assert out == "" and "expected a positive integer" in err


def test_bad_sampling_parameter(capsys, byte_model):
    rc, _, err = run(capsys, "generate", "--model", byte_model, "--prompt", "hi", "--top-p", "0")
    assert_clean_error(rc, err, "SamplingParams: top_p must be in (0, 1]")


@pytest.mark.parametrize("command", ["inspect", "chat"])
def test_no_model_and_no_bundled_model(capsys, monkeypatch, tmp_path, command):
    monkeypatch.setattr(rwkvstate.cli, "BUNDLED_MODEL", tmp_path / "models" / "default.safetensors")
    rc, out, err = run(capsys, command)
    assert_clean_error(rc, err, "no model given: pass --model NAME (see `rwkvstate models`) or a .pth/.safetensors file")
    assert out == ""


def test_bundled_model_is_used_without_model(capsys, monkeypatch, byte_model):
    monkeypatch.setattr(rwkvstate.cli, "BUNDLED_MODEL", byte_model)
    rc, out, _ = run(capsys, "inspect")
    assert rc == 0 and parse_inspect(out)["file"] == str(byte_model)


def test_debug_env_shows_the_exception(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKVSTATE_DEBUG", "1")
    with pytest.raises(CheckpointError, match="model file not found"):
        main(["inspect", "--model", str(tmp_path / "missing.pth")])


# ---- chat ------------------------------------------------------------------------------------


def chat(capsys, monkeypatch, model: Path, lines: list[str], *extra) -> tuple[int, str, str]:
    """Runs `chat` with `lines` on stdin (then EOF); input() reads them from sys.stdin."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return run(capsys, "chat", "--model", model, *extra)


def test_chat_with_reset(capsys, monkeypatch, world_model):
    msg = "Hello, who are you?"
    rc, out, err = chat(capsys, monkeypatch, world_model, [msg, "/reset", msg], "--max-tokens", 6,
                        "--temperature", 0)  # fmt: skip
    assert rc == 0, err
    assert "Traceback" not in err
    assert out.count("Assistant:") == 2
    assert out.count("User: ") == 4  # three prompts answered, the fourth hit EOF
    assert "(conversation cleared)" in err
    # greedy, and /reset restored the fresh state: the same message gets the same reply
    replies = [part.split("\n\n")[0] for part in out.split("Assistant:")[1:]]
    assert replies[0] == replies[1]


def test_chat_keeps_state_between_turns(capsys, monkeypatch, world_model):
    """Without /reset the second turn sees the first, so two identical messages differ in context."""
    msg = "Hi"
    rc, out, err = chat(capsys, monkeypatch, world_model, [msg, msg], "--max-tokens", 6, "--temperature", 0)
    assert rc == 0, err
    assert out.count("Assistant:") == 2
    replies = [part.split("\n\n")[0] for part in out.split("Assistant:")[1:]]
    assert replies[0] != replies[1]


def test_chat_undo_and_retry(capsys, monkeypatch, world_model):
    """/undo forgets an exchange (the next identical message gets the first reply again);
    /retry redoes the last reply from the same state (greedy: the same reply)."""
    rc, out, err = chat(capsys, monkeypatch, world_model, ["/undo", "/retry", "Hi", "/undo", "Hi", "/retry"],
                        "--max-tokens", 6, "--temperature", 0)  # fmt: skip
    assert rc == 0, err
    assert "(nothing to undo)" in err and "(nothing to retry)" in err and "(last exchange removed)" in err
    replies = [part.split("\n\n")[0] for part in out.split("Assistant:")[1:]]
    assert len(replies) == 3 and replies[0] == replies[1] == replies[2]


def test_chat_quit_and_blank_lines(capsys, monkeypatch, world_model):
    rc, out, err = chat(capsys, monkeypatch, world_model, ["", "   ", "/quit", "never read"], "--max-tokens", 3)
    assert rc == 0, err
    assert "Assistant:" not in out
    assert out.count("User: ") == 3


# ---- the installed console script ------------------------------------------------------------


def _is_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("rwkvstate")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _is_installed(), reason="rwkvstate runs from PYTHONPATH, not pip-installed")
def test_console_script(byte_model, tmp_path):
    script = Path(sys.executable).with_name("rwkvstate")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if k != "RWKVSTATE_DEBUG"}
    ok = subprocess.run(
        [str(script), "inspect", "--model", str(byte_model)], capture_output=True, text=True, timeout=120, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert parse_inspect(ok.stdout)["state bytes per sequence (fp32)"] == "17,408"
    bad = subprocess.run(
        [str(script), "generate", "--model", str(tmp_path / "nope.pth"), "--prompt", "x"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert_clean_error(bad.returncode, bad.stderr, "model file not found: ")


def test_generate_from_a_state_tuning_file(capsys, byte_model, tmp_path):
    c = BYTE_CFG
    g = torch.Generator().manual_seed(11)
    tuned = {f"blocks.{l}.att.time_state": torch.randn(c.n_head, c.head_size, c.head_size, generator=g)
             for l in range(c.n_layer)}  # fmt: skip
    path = tmp_path / "tuned.pth"
    torch.save(tuned, path)
    argv = ["generate", "--model", byte_model, "--prompt", "abc", "--max-tokens", 12, "--temperature", 0]
    rc, plain, _ = run(capsys, *argv)
    rc2, with_state, _ = run(capsys, *argv, "--state", path)
    assert rc == rc2 == 0 and plain != with_state
    # the same state through the Python API gives the same text
    model = rwkvstate.Model.load(byte_model)
    session = rwkvstate.Engine(model, slots=1).session()
    session.load_state({"att_shift": torch.zeros(c.n_layer, c.n_embd), "ffn_shift": torch.zeros(c.n_layer, c.n_embd),
                        "wkv": torch.stack([tuned[f"blocks.{l}.att.time_state"] for l in range(c.n_layer)])})  # fmt: skip
    session.feed("abc")
    stream = session.generate(12, rwkvstate.SamplingParams(temperature=0))
    assert with_state.rstrip("\n") == "abc" + "".join(stream)


def test_bad_state_file_is_one_clean_line(capsys, byte_model, tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"blocks.0.att.time_state": torch.zeros(3, 3, 3)}, path)
    rc, out, err = run(capsys, "generate", "--model", byte_model, "--prompt", "x", "--state", path)
    assert_clean_error(rc, err, "time_state")
    assert out == ""


# ---- messages that name the user's flag ----------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_flag(capsys, byte_model):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over undecodable argv bytes
    rc, out, err = run(capsys, "generate", "--model", byte_model, "--prompt", bad)
    assert_clean_error(rc, err, "--prompt is not valid UTF-8 text (byte 0xe9 at character 3)")
    assert out == ""


def test_a_prompt_that_is_not_utf8_from_a_real_command_line(byte_model):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("RWKVSTATE_DEBUG", None)
    argv = [sys.executable.encode(), b"-m", b"rwkvstate.cli", b"generate", b"--model", bytes(byte_model),
            b"--prompt", b"\xff\xfe"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=120, env=env)
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr == b"rwkvstate: error: --prompt is not valid UTF-8 text (byte 0xff at character 0)\n"


def test_a_prompt_file_that_is_not_utf8(capsys, byte_model, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"x = '\xe9'\n")
    rc, _, err = run(capsys, "state", "save", "--model", byte_model, "--prompt-file", path, "-o", tmp_path / "s")
    assert_clean_error(rc, err, f"--prompt-file {path} is not UTF-8 text (byte 0xe9 at offset 5)")


@pytest.mark.parametrize("prompt, tokens, message", [
    (4096, 4096, "--prompt 4096 must be less than --tokens 4096: the greedy continuation starts inside each document"),
    (1, 64, "--prompt must be at least 2 tokens, got 1"),
])  # fmt: skip
def test_eval_state_names_its_flags(capsys, byte_model, prompt, tokens, message):
    rc, _, err = run(capsys, "eval-state", "--model", byte_model, "--prompt", prompt, "--tokens", tokens)
    assert_clean_error(rc, err, message)
    assert "prompt_len" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr()[0] == f"rwkvstate {rwkvstate.__version__}\n"


def test_model_from_the_environment(capsys, monkeypatch, byte_model, world_model):
    monkeypatch.setenv("RWKVSTATE_MODEL", str(byte_model))
    rc, out, _ = run(capsys, "inspect")
    assert rc == 0 and parse_inspect(out)["file"] == str(byte_model)
    rc, out, _ = run(capsys, "inspect", "--model", world_model)  # a flag wins over the variable
    assert rc == 0 and parse_inspect(out)["file"] == str(world_model)
    monkeypatch.setenv("RWKVSTATE_STATE_DTYPE", "fp12")
    rc, _, err = run(capsys, "inspect")
    assert_clean_error(rc, err, "environment variable RWKVSTATE_STATE_DTYPE: ")
