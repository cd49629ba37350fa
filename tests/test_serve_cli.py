"""`rwkvstate serve` as an operator meets it: served-model-name aliases, the start-up and
per-request log lines, a busy port, the TOML config file and RWKVSTATE_* variables."""

from __future__ import annotations

import importlib.util

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from rwkvstate.cli import BUNDLED_MODEL, main, parse_args  # noqa: E402
from rwkvstate.model.rwkv7 import Model  # noqa: E402
from rwkvstate.server import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="the bundled model is not in this checkout")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("RWKVSTATE_")]:
        monkeypatch.delenv(var)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- aliases and the request log ----------------------------------------------------------------


def test_aliases_are_listed_and_accepted_and_each_request_is_logged(caplog):
    config = ServerConfig(model_name="code", model_aliases=("rwkv-small", "code"), slots=2)
    with BackgroundServer(create_app(Model.load(BUNDLED_MODEL), config)) as srv:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["code", "rwkv-small"]
        assert httpx.get(srv.url + "/v1/models/rwkv-small").json()["id"] == "rwkv-small"
        with caplog.at_level(logging.INFO, logger="rwkvstate.server"):
            r = httpx.post(srv.url + "/v1/completions", timeout=60,
                           json={"model": "rwkv-small", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "rwkv-small"  # answered with the name used
        bad = httpx.post(srv.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"}).json()["error"]
        assert bad["code"] == "model_not_found" and "'code', 'rwkv-small'" in bad["message"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "rwkvstate.server"]
    (line,) = [x for x in lines if x.startswith("completion ")]
    assert re.fullmatch(r"completion finish=length prompt_tokens=9 generated_tokens=5 ttft=\d+\.\d{3}s "
                        r"total=\d+\.\d{3}s tokens/s=\d+\.\d", line), line  # fmt: skip


def test_a_served_name_must_not_be_empty():
    with pytest.raises(ValueError, match="non-empty string"):
        ServerConfig(model_aliases=("ok", " "))


def test_the_http_parser_is_checked_and_auto_picks_httptools_when_installed():
    assert ServerConfig().http == "h11"
    from rwkvstate.server.http import limited_protocol, parser_name

    with pytest.raises(ValueError, match="http must be one of"):
        ServerConfig(http="h2")
    expected = "h11" if importlib.util.find_spec("httptools") is None else "httptools"
    assert parser_name("auto") == expected and parser_name("h11") == "h11"
    assert "H11" in limited_protocol("h11", 1.0, 5).__name__
    assert limited_protocol("auto", 1.0, 5).max_connections == 5


# ---- the command line -----------------------------------------------------------------------------


def test_a_busy_port_is_one_line_before_the_model_loads(capsys, monkeypatch):
    import rwkvstate.cli

    monkeypatch.setattr(rwkvstate.cli, "load_model", lambda args: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"rwkvstate: error: port {port} on 127.0.0.1 is already in use: stop what is "
                               f"listening there or pick another --port\n")  # fmt: skip


def test_config_file_environment_and_flags_in_that_order(tmp_path, monkeypatch):
    config = tmp_path / "serve.toml"
    config.write_text('port = 9001\nslots = 3\nhost = "0.0.0.0"\nserved-model-name = ["a", "b"]\n'
                      'state_dir = "states"\nrequest-timeout = 30\nlog-level = "warning"\n')  # fmt: skip
    args = parse_args(["serve", "--config", str(config)])
    assert (args.port, args.slots, args.host, args.served_model_name) == (9001, 3, "0.0.0.0", ["a", "b"])
    assert (str(args.state_dir), args.request_timeout, args.log_level) == ("states", 30.0, "warning")
    monkeypatch.setenv("RWKVSTATE_PORT", "9002")
    monkeypatch.setenv("RWKVSTATE_SERVED_MODEL_NAME", "c, d")
    monkeypatch.setenv("RWKVSTATE_API_KEY", "k1")
    args = parse_args(["serve", "--config", str(config)])
    assert (args.port, args.served_model_name, args.slots, args.api_key) == (9002, ["c", "d"], 3, "k1")
    args = parse_args(["serve", "--config", str(config), "--port", "9003", "--served-model-name", "e", "--slots", "5"])
    assert (args.port, args.served_model_name, args.slots) == (9003, ["e"], 5)
    monkeypatch.setenv("RWKVSTATE_PORT", "9004")  # host, port and the rest apply to serve only
    assert not hasattr(parse_args(["inspect"]), "port")


@pytest.mark.parametrize("text, message", [
    ("prot = 1\n", "unknown setting 'prot' (settings are the serve flags: "),
    ("port = 70000\n", ": port: a port must be in 0..65535, got 70000"),
    ("slots = 0\n", ": slots: expected a positive integer, got 0"),
    ('log-level = "loud"\n', ": log-level: 'loud' is not one of critical, error"),
    ("port = [1]\n", ": port: expected a single value, got [1]"),
    ('state-dtype = "fp12"\n', ": state-dtype: unknown dtype 'fp12'"),
    ("port = \n", "not valid TOML"),
])  # fmt: skip
def test_a_bad_config_file_is_one_line(capsys, tmp_path, text, message):
    config = tmp_path / "serve.toml"
    config.write_text(text)
    assert main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rwkvstate: error: ") and message in err, err


def test_a_bad_variable_names_itself(capsys, monkeypatch):
    monkeypatch.setenv("RWKVSTATE_PORT", "eighty")
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == ("rwkvstate: error: environment variable RWKVSTATE_PORT: "
                                       "expected a port number, got 'eighty'\n")  # fmt: skip


def test_serve_end_to_end_logs_model_device_slots_and_requests(tmp_path):
    """The real command in a fresh process, configured by a file and a variable."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f'port = {port}\nslots = 2\nserved-model-name = ["code", "small"]\nstate-dtype = "fp16"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "RWKVSTATE_API_KEY": "secret"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "rwkvstate.cli", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": "Bearer secret"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the variable
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "small"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert re.search(r"model .*stdlib-byte-l8-c256\.safetensors: RWKV-7, 8 layers, n_embd 256, vocab 256 "
                     r"\(bytes tokenizer\); served as code, small", err), err  # fmt: skip
    assert "device cpu, 2 slots, compute dtype fp32, state dtype fp16" in err
    assert re.search(r"chat finish=\w+ prompt_tokens=\d+ generated_tokens=\d+ ttft=", err)
    assert "Traceback" not in err


def test_a_model_given_by_name_is_served_under_that_name():
    from rwkvstate.cli.serve import _name_of

    assert _name_of("RWKV7-G1D-0.1B") == ["rwkv7-g1d-0.1b"]
    assert _name_of("rwkv7-g1d-0.1b-20260129-ctx8192.pth") == []  # a path: its stem, as before
    assert _name_of(None) == [] and _name_of("unknown-name") == []


def test_ingresses_without_replicas_is_one_line(capsys):
    assert main(["serve", "--ingress-replicas", "2"]) == 1
    assert capsys.readouterr().err == ("rwkvstate: error: --ingress-replicas sets the ingresses in front of "
                                       "--replicas; give --replicas too\n")  # fmt: skip


def test_api_processes_default_to_half_the_cores_at_most_eight(monkeypatch):
    from rwkvstate.cli.serve import resolve_api_processes

    assert parse_args(["serve"]).api_processes == "auto"
    assert parse_args(["serve", "--api-processes", "3"]).api_processes == 3
    for cores, expected in ((None, 1), (1, 1), (2, 1), (7, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert resolve_api_processes("auto", False, None) == expected, cores
        assert resolve_api_processes("auto", True, None) == 1  # the core shares the one API process
        assert resolve_api_processes("auto", False, 2) == 1  # replicas serve
        assert resolve_api_processes(5, False, None) == 5


@pytest.mark.parametrize("flags, message", [
    (["--api-processes", "0"], "argument --api-processes: expected a positive integer or auto, got 0\n"),
    (["--api-processes", "many"], "argument --api-processes: expected a positive integer or auto, got many\n"),
])  # fmt: skip
def test_a_bad_api_process_count_is_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(["serve", *flags])
    assert message in capsys.readouterr().err


def test_one_api_process_goes_with_an_in_process_core(capsys):
    assert main(["serve", "--in-process-core", "--api-processes", "2"]) == 1
    assert capsys.readouterr().err == ("rwkvstate: error: --in-process-core runs one API process: leave out "
                                       "--api-processes\n")  # fmt: skip
