"""State files: a session's state, token log and next-token logits in one verified file.

A state file is a safetensors file (docs/state-formats.md, "State files"):

    att_shift [L, C], wkv [L, H, N, N], ffn_shift [L, C]   in the storage dtype (fp32/fp16/bf16)
    tokens    int32 [n]                                    the session's token log
    logits    float32 [vocab]                              optional: next-token logits

plus string metadata: format name and version, the model's fingerprint and description,
storage dtype, token count, creation time and a sha256 checksum over all of the above.
Reading validates everything before returning, so a caller that restores only what
read_state_file returned can never half-load a bad file.

This module knows neither models nor sessions: callers pass the model's fingerprint and
description (Model.fingerprint, Model.description) and the layout to check against;
runtime/persist.py saves and loads sessions through it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StateError
from ..tokenizer import check_token_ids
from .convert import infer_dims, validate_canonical
from .layout import (
    CANONICAL_KEYS,
    SAFETENSORS_DTYPE_NAMES,
    STORAGE_DTYPES,
    StateLayout,
    dtype_name,
    parse_dtype,
)

FORMAT_NAME = "rwkvstate-state"
FORMAT_VERSION = 1
# Metadata every version-1 file carries; "extra" (JSON) is optional.
REQUIRED_META = (
    "format", "format_version", "model_fingerprint", "model_info",
    "storage_dtype", "token_count", "created", "checksum",
)  # fmt: skip
_INT32_MAX = 2**31 - 1


@dataclass
class StateFile:
    """What read_state_file returns: everything validated, state as float32 CPU tensors."""

    state: dict[str, torch.Tensor]
    tokens: list[int]
    logits: torch.Tensor | None  # float32 [vocab] on CPU
    meta: dict[str, str]  # the file's metadata as stored
    extra: dict = field(default_factory=dict)  # the caller's `extra` given to save_state_file


# ---- checksum -------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _checksum(meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every metadata field but "checksum" (sorted by key), then every tensor
    (sorted by name): name, dtype, shape, raw bytes. Each item is length-prefixed, so no two
    different files hash the same byte stream."""
    h = hashlib.sha256()

    def put(item: bytes) -> None:
        h.update(struct.pack("<Q", len(item)))
        h.update(item)

    for key in sorted(k for k in meta if k != "checksum"):
        put(key.encode())
        put(str(meta[key]).encode())
    for name in sorted(tensors):
        t = tensors[name]
        put(name.encode())
        put(SAFETENSORS_DTYPE_NAMES.get(t.dtype, str(t.dtype)).encode())
        put(json.dumps(list(t.shape)).encode())
        put(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


# ---- writing --------------------------------------------------------------------------------


def _storage_dtype(value) -> tuple[str, torch.dtype]:
    try:
        dtype = parse_dtype(value)
    except ValueError as e:
        raise StateError(str(e)) from None
    return dtype_name(dtype), dtype


def _encode_state(state: Mapping, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The canonical state converted to the storage dtype; refuses values it cannot hold."""
    checked = validate_canonical(state, *infer_dims(state))
    out = {}
    for name, t in checked.items():
        stored = t.to(dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise StateError(f"state['{name}'] has values up to {t.abs().max().item():.4g}, "
                             f"beyond the range of {dtype} storage")  # fmt: skip
        out[name] = stored
    return out


def _encode_tokens(tokens: Sequence[int]) -> torch.Tensor:
    try:
        ids = [int(t) for t in tokens]
        check_token_ids(ids, _INT32_MAX + 1)
    except (TypeError, ValueError) as e:
        raise StateError(f"tokens must be a sequence of integer ids below 2**31: {e}") from None
    return torch.tensor(ids, dtype=torch.int32).reshape(-1)


def _encode_logits(logits) -> torch.Tensor:
    t = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float32).contiguous()
    if t.dim() != 1:
        raise StateError(f"logits must be a vector [vocab], got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise StateError("logits have NaN or infinite values")
    return t


def save_state_file(
    path, state: Mapping, *, fingerprint: str, model_info: str, storage_dtype="fp32",
    tokens: Sequence[int] = (), logits=None, extra: Mapping | None = None,
) -> Path:  # fmt: skip
    """Writes a state file atomically (temp file in the same directory, fsync, rename).

    state: canonical dict (any real dtype); stored in storage_dtype (fp32/fp16/bf16 or a torch
    dtype), refusing values that overflow it. extra: JSON-serialisable dict kept in metadata.
    On any failure the target is untouched and no temporary file is left. Returns the path.
    """
    path = Path(path)
    dtype_key, dtype = _storage_dtype(storage_dtype)
    tensors = _encode_state(state, dtype)
    tensors["tokens"] = _encode_tokens(tokens)
    if logits is not None:
        tensors["logits"] = _encode_logits(logits)
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "model_fingerprint": str(fingerprint), "model_info": str(model_info),
        "storage_dtype": dtype_key, "token_count": str(len(tensors["tokens"])),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    if extra:
        try:
            meta["extra"] = json.dumps(dict(extra), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StateError(f"extra metadata must be JSON-serialisable: {e}") from None
    meta["checksum"] = _checksum(meta, tensors)
    from safetensors.torch import save

    _write_atomic(path, save(tensors, metadata=meta))
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file next to the target, fsync, os.replace: readers see the old file or the new one."""
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise StateError(f"cannot write state file {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StateError(f"cannot write state file {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the file the mode open() would
                os.fchmod(f.fileno(), _new_file_mode(path))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise StateError(f"cannot write state file {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(directory)


def _new_file_mode(path: Path) -> int:
    """The target's current mode if it exists, else what open() would give under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it, even for a
    moment, would change the mode of files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)  # elsewhere: the only portable way
    os.umask(umask)
    return umask


def _fsync_dir(directory: Path) -> None:
    """Makes the rename durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- reading --------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise StateError(f"state file not found: {path}")
    if path.is_dir():
        raise StateError(f"{path} is a directory, not a state file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror or e}") from e


def _parse(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(tensors, metadata, file size) of a safetensors file; StateError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_bytes(path)
    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, TypeError, struct.error, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateError(f"{path} is truncated or not a safetensors state file ({reason})") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}, len(data)


def _check_header(path: Path, meta: Mapping[str, str]) -> None:
    """Format name, version and required keys: the checks that decide how to read the rest."""
    name = meta.get("format")
    if name != FORMAT_NAME:
        found = "no format name" if name is None else f"format {name!r}"
        raise StateError(f"{path} is a safetensors file but not an rwkvstate state file "
                         f"({found}, expected {FORMAT_NAME!r})")  # fmt: skip
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
        hint = "; it was written by a newer rwkvstate, upgrade to read it" if newer else ""
        raise StateError(f"{path}: state file format version {version!r} is not supported "
                         f"(this rwkvstate reads version {FORMAT_VERSION}){hint}")  # fmt: skip
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StateError(f"{path}: state file metadata is missing {missing}")


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """Names, dtypes and ranks, and their agreement with the metadata."""
    names = set(tensors)
    missing = [k for k in (*CANONICAL_KEYS, "tokens") if k not in names]
    unknown = sorted(names - {*CANONICAL_KEYS, "tokens", "logits"})
    if missing or unknown:
        raise StateError(f"{path}: state file tensors are wrong (missing {missing}, unexpected {unknown})")
    if meta["storage_dtype"] not in STORAGE_DTYPES:
        raise StateError(f"{path}: unknown storage dtype {meta['storage_dtype']!r} (expected fp32, fp16 or bf16)")
    dtype = STORAGE_DTYPES[meta["storage_dtype"]]
    for key in CANONICAL_KEYS:
        if tensors[key].dtype != dtype:
            raise StateError(f"{path}: {key} is {tensors[key].dtype}, but the file says {meta['storage_dtype']}")
    tokens = tensors["tokens"]
    if tokens.dtype != torch.int32 or tokens.dim() != 1:
        raise StateError(f"{path}: tokens must be int32 [n], got {tokens.dtype} {list(tokens.shape)}")
    if meta["token_count"] != str(tokens.numel()):
        raise StateError(f"{path}: metadata says {meta['token_count']} tokens, but the file holds {tokens.numel()}")
    logits = tensors.get("logits")
    if logits is not None and (logits.dtype != torch.float32 or logits.dim() != 1):
        raise StateError(f"{path}: logits must be float32 [vocab], got {logits.dtype} {list(logits.shape)}")


def _check_fingerprint(path: Path, meta: Mapping[str, str], fingerprint: str | None, model_info: str | None):
    if fingerprint is None or meta["model_fingerprint"] == fingerprint:
        return
    current = f" ({model_info})" if model_info else ""
    raise StateError(f"{path} was saved from a different model: file model fingerprint "
                     f"{meta['model_fingerprint']} ({meta['model_info']}), current model fingerprint "
                     f"{fingerprint}{current}")  # fmt: skip


def _check_state(path: Path, tensors, layout: StateLayout | None) -> dict[str, torch.Tensor]:
    """Shapes (against layout if given, else self-consistent) and finiteness; float32 out."""
    state = {k: tensors[k] for k in CANONICAL_KEYS}
    try:
        dims = (layout.n_layer, layout.n_embd, layout.head_size) if layout is not None else infer_dims(state)
        return validate_canonical(state, *dims)
    except StateError as e:
        where = f" (the model needs n_layer={dims[0]}, n_embd={dims[1]}, head_size={dims[2]})" if layout else ""
        raise StateError(f"{path}: {e}{where}") from None


def _check_tokens_logits(path: Path, tensors, vocab_size: int | None) -> None:
    logits = tensors.get("logits")
    if logits is not None:
        if vocab_size is not None and logits.numel() != vocab_size:
            raise StateError(f"{path}: logits have {logits.numel()} entries, the model's vocab is {vocab_size}")
        if not torch.isfinite(logits).all():
            raise StateError(f"{path}: logits have NaN or infinite values")
        vocab_size = logits.numel()
    top = vocab_size if vocab_size is not None else _INT32_MAX + 1
    try:
        check_token_ids(tensors["tokens"].tolist(), top)
    except ValueError as e:
        raise StateError(f"{path}: {e}") from None


def _validate(path, tensors, meta, fingerprint=None, model_info=None, layout=None, vocab_size=None) -> StateFile:
    _check_header(path, meta)
    if _checksum(meta, tensors) != meta["checksum"]:
        raise StateError(f"{path}: checksum mismatch: the file was modified or corrupted")
    _check_fingerprint(path, meta, fingerprint, model_info)
    _check_tensors(path, tensors, meta)
    state = _check_state(path, tensors, layout)
    _check_tokens_logits(path, tensors, vocab_size)
    try:
        extra = json.loads(meta["extra"]) if "extra" in meta else {}
    except ValueError:
        raise StateError(f"{path}: metadata 'extra' is not valid JSON") from None
    logits = tensors.get("logits")
    return StateFile(state, tensors["tokens"].tolist(), None if logits is None else logits.clone(), dict(meta), extra)


def read_state_file(
    path, *, fingerprint: str | None = None, layout: StateLayout | None = None,
    vocab_size: int | None = None, model_info: str | None = None,
) -> StateFile:  # fmt: skip
    """Reads and fully validates a state file; every failure is a one-line StateError naming path.

    Checks, in order: the file exists and is a complete safetensors file; format name;
    format version; checksum; the model fingerprint (if given; model_info names the current
    model in the message); tensor names, dtypes and token count; state shapes (against
    layout if given); finite values; token ids and logits length against vocab_size (or the
    stored logits' length when vocab_size is not given).
    """
    path = Path(path)
    tensors, meta, _ = _parse(path)
    return _validate(path, tensors, meta, fingerprint, model_info, layout, vocab_size)


def is_state_file(path) -> bool:
    """Whether `path` is an rwkvstate state file, judged from its safetensors header alone
    (so a multi-GB file of another kind is not read); False for anything unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def inspect_state_file(path) -> dict:
    """Metadata, tensors, size and a verdict, for `rwkvstate state inspect`.

    Raises StateError only if the file cannot be parsed at all; otherwise "problem" is None for
    a valid file or the one-line reason it would be refused by read_state_file.
    """
    path = Path(path)
    tensors, meta, size = _parse(path)
    info = {
        "path": str(path), "file_size": size, "metadata": _ordered(meta),
        "tensors": {name: {"dtype": SAFETENSORS_DTYPE_NAMES.get(t.dtype, str(t.dtype)), "shape": list(t.shape),
                           "max_abs": _max_abs(t)} for name, t in sorted(tensors.items())},
        "checksum_ok": "checksum" in meta and _checksum(meta, tensors) == meta["checksum"],
    }  # fmt: skip
    try:
        _validate(path, tensors, meta)
        info["problem"] = None
    except StateError as e:
        info["problem"] = str(e)
    return info


def _ordered(meta: Mapping[str, str]) -> dict[str, str]:
    """Metadata in the documented key order, then any other keys sorted."""
    rank = {k: i for i, k in enumerate(REQUIRED_META)}
    return dict(sorted(meta.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _max_abs(t: torch.Tensor) -> float | None:
    if t.numel() == 0 or not t.is_floating_point():
        return None
    return float(t.float().abs().max())
