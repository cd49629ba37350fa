"""The `rwkvstate` command line: generate, chat, inspect, state files, models by name, serve.

Errors are printed as one line on stderr with a non-zero exit, never a traceback
(set RWKVSTATE_DEBUG=1 to see one). Models by name live in `cli/models.py`, the server's
flags, config file and environment in `cli/serve.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..errors import RwkvStateError, first_line
from ..state.layout import dtype_name, parse_dtype
from .models import BUNDLED_MODEL, BUNDLED_NAME
from .speed import configure_threads, run_reply


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, metavar="NAME|PATH",
        help=f"a model name from `rwkvstate models` (downloaded and cached on first use) or an RWKV-7 "
             f".pth/.safetensors file; default: the bundled {BUNDLED_NAME}",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="compute dtype: fp32, fp16, bf16 (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--state-dtype", default="fp32", help="state storage dtype: fp32, fp16, bf16 (default: fp32)")
    p.add_argument("--tokenizer", choices=("world", "bytes"), default=None, help="override the tokenizer kind")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: $OMP_NUM_THREADS, else half the cores; README)")


def _add_state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state", type=Path, default=None,
        help="start from a state file: one written by `rwkvstate state save`, or a state-tuning file "
             "(.pth/.safetensors with blocks.N.att.time_state, or web-rwkv .st)",
    )  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling mass (default: 0.85)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default: 0)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability, 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvstate", description="RWKV-7 inference built around the recurrent state")
    parser.add_argument("--version", action="version", version=f"rwkvstate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt, streamed to stdout")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="text to continue")
    _add_state_arg(gen)
    _add_sampling_args(gen, max_tokens=200)
    gen.add_argument("--quiet", action="store_true", help="no speed summary on stderr")

    chat = sub.add_parser("chat", help="interactive chat that keeps the session state between turns")
    _add_model_args(chat)
    _add_state_arg(chat)
    _add_sampling_args(chat, max_tokens=500)
    chat.add_argument("--system", default=None, help="a system prompt that starts the conversation")
    chat.add_argument("--quiet", action="store_true", help="no speed summary on stderr after each reply")

    ev = sub.add_parser(
        "eval-state", help="quality cost of fp16/bf16 state storage and snapshots, on held-out stdlib text"
    )
    _add_model_args(ev)
    ev.add_argument("--docs", type=_positive_int, default=16, help="held-out documents (default: 16)")
    ev.add_argument("--tokens", type=_positive_int, default=4096, help="tokens per document (default: 4096)")
    ev.add_argument("--prompt", type=_positive_int, default=2048, help="greedy continuation prompt (default: 2048)")
    ev.add_argument("--generate", type=_positive_int, default=256, help="greedy tokens compared (default: 256)")
    ev.add_argument("--stdlib", type=Path, default=None, help="a copy of a Python stdlib to take held-out files from")
    ev.add_argument("--variants", choices=("storage", "snapshots"), default="storage",
                    help="storage: fp16/bf16 pool storage and rounding (default); snapshots: every snapshot format")
    ev.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")

    inspect = sub.add_parser("inspect", help="model config, parameter count and state bytes per sequence")
    _add_model_args(inspect)
    _add_state_file_parser(sub)
    from . import models, serve

    serve.add_parser(sub, _add_model_args, _positive_int)
    models.add_parsers(sub)
    _add_bench_parser(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name -> subparser, for defaults from the environment and --config
    return parser


def load_model(args):
    from ..model.rwkv7 import Model

    path, device, dtype, tokenizer = _model_options(args)
    model = Model.load(path, device=device, dtype=dtype, tokenizer=tokenizer)
    _check_tokenizer_fits(model, args.tokenizer)
    return model


def model_spec(args):
    """What an engine core process loads (`serve`): the model options checked, and a model given
    by name fetched, here, so a bad value fails before any process starts."""
    from ..runtime.core import ModelSpec

    path, device, dtype, tokenizer = _model_options(args)
    return ModelSpec(path=str(path), device=str(device), dtype=dtype_name(dtype), tokenizer=tokenizer)


def _model_options(args):
    """(path, device, dtype, tokenizer) from --model (a path or a name), --device, --dtype and
    --tokenizer, with --state-dtype checked: bad values fail before the (slow) load."""
    from .models import resolve_model

    parse_dtype(args.state_dtype)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise RwkvStateError(f"unknown device {args.device!r}; use cpu, cuda or cuda:N")
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    path, table_tokenizer = resolve_model(args.model, BUNDLED_MODEL)
    return path, device, dtype, args.tokenizer or table_tokenizer


def _check_tokenizer_fits(model, override: str | None) -> None:
    """A --tokenizer whose ids do not match the model's vocabulary would fail on the first
    token (or emit ids it cannot decode): refuse it here, naming the flag."""
    vocab, ids = model.config.vocab_size, model.tokenizer.vocab_size
    if override is not None and ids != vocab:
        kind = {256: "a byte-level model", 65536: "a world-vocabulary model"}.get(vocab, "this model")
        raise RwkvStateError(f"--tokenizer {override} has {ids} token ids, but {kind} has a vocabulary of {vocab}: "
                             f"leave --tokenizer out to use the model's own")  # fmt: skip


def _sampling(args):
    from ..runtime.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed,
    )  # fmt: skip


def _session(args, model):
    """A one-slot engine's session, started from --state when given."""
    from ..runtime.engine import Engine

    session = Engine(model, slots=1, state_dtype=parse_dtype(args.state_dtype)).session()
    if args.state is not None:
        load_start_state(session, args.state)
    return session


def load_start_state(session, path: Path) -> None:
    """--state: an rwkvstate state file (state, token log and logits) or a state-tuning file."""
    from ..runtime.persist import load_session
    from ..state import files
    from ..state.convert import load_state_tuning_file

    if files.is_state_file(path):
        load_session(session, path)
        return
    c = session.engine.model.config
    session.load_state(load_state_tuning_file(path, c.n_layer, c.n_embd, c.head_size))


def cmd_generate(args) -> int:
    sampling = _sampling(args)
    model = load_model(args)
    session = _session(args, model)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = session.generate(max_tokens=args.max_tokens, sampling=sampling, prompt=args.prompt)
    timing = run_reply(stream, lambda piece: (out.write(piece), out.flush()))
    out.write("\n")
    if not args.quiet:
        print(timing.summary(), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatConsole, base_model_warning

    sampling = _sampling(args)
    model = load_model(args)
    warning = base_model_warning(model)
    if warning:
        print(warning, file=sys.stderr)
    console = ChatConsole(_session(args, model), sampling, args.max_tokens, quiet=args.quiet, system=args.system)
    return console.run()


def cmd_inspect(args) -> int:
    model = load_model(args)
    c = model.config
    layout = model.state_layout
    rows = [
        ("file", str(model.path)),
        ("layers", c.n_layer), ("n_embd", c.n_embd), ("head_size", c.head_size), ("heads", c.n_head),
        ("vocab", c.vocab_size), ("tokenizer", c.tokenizer), ("ffn_dim", c.ffn_dim),
        ("lora ranks (decay, iclr, value, gate)", f"{c.decay_rank}, {c.aaa_rank}, {c.mv_rank}, {c.gate_rank}"),
        ("parameters", f"{model.num_params():,}"), ("fingerprint", model.fingerprint),
        ("state elements per sequence", f"{layout.slot_numel:,}"),
    ]  # fmt: skip
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows.append((f"state bytes per sequence ({dtype_name(dtype)})", f"{layout.slot_nbytes(dtype):,}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_eval_state(args) -> int:
    import datetime
    import json
    import platform

    from ..evaluation import (
        default_variants,
        evaluate_state_precision,
        held_out_token_docs,
        precision_markdown,
        results_json,
        snapshot_variants,
    )

    if args.prompt >= args.tokens:
        raise RwkvStateError(f"--prompt {args.prompt} must be less than --tokens {args.tokens}: the greedy "
                             "continuation starts inside each document")  # fmt: skip
    if args.prompt < 2:
        raise RwkvStateError(f"--prompt must be at least 2 tokens, got {args.prompt}")
    model = load_model(args)
    docs = held_out_token_docs(model.tokenizer, args.tokens, args.docs, args.stdlib)
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    variants = snapshot_variants() if args.variants == "snapshots" else default_variants()
    results, info = evaluate_state_precision(model, docs, variants, args.prompt, args.generate, log=log,
                                             progress=sys.stderr.isatty())
    if model.device.type == "cuda":
        where = torch.cuda.get_device_name(model.device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()})"
    meta = {"model": str(model.path), "compute_dtype": dtype_name(model.dtype), "device": where,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__}  # fmt: skip
    stored = results_json(results, info, meta)
    table = precision_markdown(json.loads(stored))  # the markdown is a rendering of the stored JSON
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table)
        args.out.with_suffix(".json").write_text(stored)
    return 0


def _add_state_file_parser(sub) -> None:
    """`rwkvstate state {save,load,inspect}`: session state files (docs/state-formats.md)."""
    verbs = sub.add_parser("state", help="save, load and inspect session state files").add_subparsers(
        dest="state_command", required=True
    )
    save = verbs.add_parser("save", help="feed a prompt into a new session and save it to a state file")
    _add_model_args(save)
    _add_state_arg(save)
    text = save.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text to feed")
    text.add_argument("--prompt-file", type=Path, help="a UTF-8 text file to feed")
    save.add_argument("-o", "--output", type=Path, required=True, help="state file to write")
    save.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    load = verbs.add_parser("load", help="load a state file into a new session and continue it")
    load.add_argument("file", type=Path, help="a file written by `rwkvstate state save`")
    _add_model_args(load)
    load.add_argument("--prompt", default=None, help="text to feed after loading, before generating")
    load.add_argument("--allow-other-weights", action="store_true",
                      help="load a file saved from other weights of the same shape (e.g. a base model's state)")
    _add_sampling_args(load, max_tokens=200)
    load.set_defaults(state=None)
    inspect = verbs.add_parser("inspect", help="print a state file's metadata and verify it (exit 1 if bad)")
    inspect.add_argument("file", type=Path)


def _read_prompt_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RwkvStateError(f"--prompt-file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")


def cmd_state(args) -> int:
    from ..runtime.persist import load_session, save_session
    from ..state import files

    if args.state_command == "inspect":
        info = files.inspect_state_file(args.file)
        meta = dict(info["metadata"])
        checksum = meta.pop("checksum", "none")
        rows = [("file", info["path"]), ("size", f"{info['file_size']:,} bytes"), *meta.items()]
        for name, t in info["tensors"].items():
            stat = "" if t["max_abs"] is None else f", max |x| {t['max_abs']:.4g}"
            rows.append((f"tensor {name}", f"{t['dtype']} {t['shape']}{stat}"))
        rows.append(("checksum", f"{checksum} ({'verified' if info['checksum_ok'] else 'MISMATCH'})"))
        rows.append(("verdict", "OK" if info["problem"] is None else "BAD"))
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
        if info["problem"] is not None:
            print(f"rwkvstate: error: {info['problem']}", file=sys.stderr)
            return 1
        return 0
    sampling = _sampling(args) if args.state_command == "load" else None
    if args.state_command == "save" and args.output.exists() and not args.force:
        raise RwkvStateError(f"{args.output} exists; pass --force to overwrite it (-o/--output)")
    model = load_model(args)
    session = _session(args, model)
    if args.state_command == "save":
        session.feed(args.prompt if args.prompt is not None else _read_prompt_file(args.prompt_file))
        path = save_session(session, args.output)
        dtype = dtype_name(session.engine.pool.dtype)
        size = path.stat().st_size
        print(f"saved {len(session.tokens)} tokens ({dtype} state, {size:,} bytes) to {path}", file=sys.stderr)
        return 0
    loaded = load_session(session, args.file, allow_other_weights=args.allow_other_weights)
    print(f"loaded {args.file}: {len(loaded.tokens)} tokens, saved {loaded.meta['created']}", file=sys.stderr)
    if args.prompt:
        session.feed(args.prompt)
        sys.stdout.write(args.prompt)
    for piece in session.generate(max_tokens=args.max_tokens, sampling=sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _add_bench_parser(sub) -> None:
    """`rwkvstate bench impact`: benchmarks/bench_impact.py of the source checkout (not installed with
    the package: the benchmarks live beside it, with their results under docs/)."""
    kinds = sub.add_parser("bench", help="benchmarks (a source-checkout command: pip install -e . from a clone)").add_subparsers(
        dest="bench_command", required=True
    )
    p = kinds.add_parser("impact", help="the seed design's Estimated Impact table, measured (docs/impact.md)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT-*.png charts and (without --doc) OUT.md")
    p.add_argument("--doc", type=Path, default=None, help="write the markdown here instead (e.g. docs/impact.md)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated, of 0.1B,1.5B,7.2B (default: all; none with --merge)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes (default: 1,64,256; 1,4,16 with --tiny)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="repeats of each measurement (default: 5; 3 with --tiny)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="timed decode steps per repeat (default: 20; 5 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run, not GPU figures")
    p.add_argument("--merge", type=Path, nargs="+", default=[], help="earlier JSON results to merge with this run")


def cmd_bench(args) -> int:
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_impact.py"
    if not path.exists():
        raise RwkvStateError(
            f"rwkvstate bench needs a source checkout: it runs benchmarks/bench_impact.py of the clone the "
            f"package is installed from (pip install -e .), and this installation has none ({path} does not exist)"
        )
    spec = importlib.util.spec_from_file_location("bench_impact", path)
    if spec is None or spec.loader is None:
        raise RwkvStateError(f"rwkvstate bench cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_from_args(args)


def cmd_serve(args) -> int:
    from .serve import cmd_serve as run

    return run(args, load_model, model_spec)


def cmd_pull(args) -> int:
    from .models import cmd_pull as run

    return run(args)


def cmd_models(args) -> int:
    from .models import cmd_models as run

    return run(args)


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "inspect": cmd_inspect, "eval-state": cmd_eval_state,
    "state": cmd_state, "serve": cmd_serve, "bench": cmd_bench, "pull": cmd_pull, "models": cmd_models,
}  # fmt: skip


def _version() -> str:
    """The installed distribution's version, else the package's own (running from a checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("rwkvstate")
    except importlib.metadata.PackageNotFoundError:
        from ..version import __version__

        return __version__


def parse_args(argv=None):
    """Parses twice: once to learn the command (and --config), then with the defaults that the
    config file and RWKVSTATE_* variables give, which flags on the command line override."""
    from .serve import apply_layered_defaults

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    first = parser.parse_args(argv)
    apply_layered_defaults(parser.commands, first)
    args = parser.parse_args(argv)
    _check_text_flags(args)
    return args


def _check_text_flags(args) -> None:
    """A text flag that is not valid UTF-8 (bytes the OS could not decode arrive as surrogate
    escapes) is refused naming the flag, instead of a codec error later."""
    for dest, value in vars(args).items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raw = value[e.start].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(value[e.start]) <= 0xDCFF else b""
            byte = f" (byte {raw[0]:#04x} at character {e.start})" if raw else ""
            raise RwkvStateError(f"--{dest.replace('_', '-')} is not valid UTF-8 text{byte}")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if hasattr(args, "threads"):  # before any model work: torch fixes its thread pools on first use
            configure_threads(args.threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (RwkvStateError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("RWKVSTATE_DEBUG"):
            raise
        print(f"rwkvstate: error: {first_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
