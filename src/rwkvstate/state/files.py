"""State files: a session's state, token log and next-token logits in one verified file.

A state file is a safetensors file (docs/state-formats.md, "State files"):

    att_shift [L, C], wkv [L, H, N, N], ffn_shift [L, C]   in the storage dtype (fp32/fp16/bf16)
    tokens    int32 [n]                                    the session's token log
    logits    float32 [vocab]                              optional: next-token logits

plus string metadata: format name and version, the model's fingerprint and description,
storage dtype, token count, creation time and a sha256 checksum over all of the above.
The zero state (a new or reset session) is not stored: the metadata names its sizes instead
(`zero_state`, format version 2), so an empty session's file is a few hundred bytes.
Reading validates everything before returning, so a caller that restores only what
read_state_file returned can never half-load a bad file; it reads no more than a size cap.

This module knows neither models nor sessions: callers pass the model's fingerprint and
description (Model.fingerprint, Model.description) and the layout to check against;
runtime/persist.py saves and loads sessions through it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StateError, StorageError, first_line
from ..tokenizer import check_token_ids
from .convert import infer_dims, validate_canonical, zero_state
from .layout import (
    CANONICAL_KEYS,
    SAFETENSORS_DTYPE_NAMES,
    STORAGE_DTYPES,
    StateLayout,
    dtype_name,
    parse_dtype,
)

FORMAT_NAME = "rwkvstate-state"
# Version 2 adds files without state tensors (metadata `zero_state`); a file that stores its
# state is written as version 1, which every reader reads.
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
MAX_FILE_TOKENS = 1 << 24  # the longest token log a file holds (64 MiB of int32)
MAX_FILE_BYTES = 1 << 30  # the size cap of a file read without a model's layout (inspect)
_HEADER_BYTES = 1 << 20  # allowance for the JSON header and metadata
_MAX_ZERO_NUMEL = 1 << 28  # the largest zero state a file may name when no layout is given
# Metadata every version-1 file carries; "extra" (JSON) is optional.
REQUIRED_META = (
    "format", "format_version", "model_fingerprint", "model_info",
    "storage_dtype", "token_count", "created", "checksum",
)  # fmt: skip
_INT32_MAX = 2**31 - 1
# An interrupted write leaves `.<name>.<8 random characters>.tmp` next to its target
# (tempfile.mkstemp's names); remove_stale_temp_files finds exactly these.
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@dataclass
class StateFile:
    """What read_state_file returns: everything validated, state as float32 CPU tensors."""

    state: dict[str, torch.Tensor]
    tokens: list[int]
    logits: torch.Tensor | None  # float32 [vocab] on CPU
    meta: dict[str, str]  # the file's metadata as stored
    extra: dict = field(default_factory=dict)  # the caller's `extra` given to save_state_file
    is_zero_state: bool = False  # the file stored no state: `state` is the zero state

    @property
    def is_empty(self) -> bool:
        """The zero state with no tokens: what a new or reset session holds."""
        return self.is_zero_state and not self.tokens and self.logits is None


def max_file_bytes(layout: StateLayout | None = None, vocab_size: int | None = None) -> int:
    """The size cap for reading a state file: the largest a valid file can be for this layout
    (fp32 state, logits, MAX_FILE_TOKENS tokens, header), or MAX_FILE_BYTES without one."""
    if layout is None:
        return MAX_FILE_BYTES
    logits = 4 * (vocab_size if vocab_size is not None else MAX_FILE_TOKENS)
    return layout.slot_nbytes(torch.float32) + logits + 4 * MAX_FILE_TOKENS + _HEADER_BYTES


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
    if len(ids) > MAX_FILE_TOKENS:
        raise StateError(f"a token log of {len(ids):,} tokens is longer than a state file holds ({MAX_FILE_TOKENS:,})")
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

    state: canonical dict (any real dtype); stored in storage_dtype (fp32/fp16/bf16, a torch
    dtype, or int8: per-group quantised), refusing values that overflow it. extra:
    JSON-serialisable dict kept in metadata. On any failure the target is untouched and no
    temporary file is left. Returns the path.
    """
    path = Path(path)
    data = encode_state_file(state, fingerprint=fingerprint, model_info=model_info, storage_dtype=storage_dtype,
                             tokens=tokens, logits=logits, extra=extra)  # fmt: skip
    _write_atomic(path, data)
    return path


def encode_state_file(
    state: Mapping, *, fingerprint: str, model_info: str, storage_dtype="fp32",
    tokens: Sequence[int] = (), logits=None, extra: Mapping | None = None,
) -> bytes:  # fmt: skip
    """The bytes of a state file (what save_state_file writes): for stores that are not files."""
    dtype_key, tensors = _encode_state_as(state, storage_dtype)
    zero = _zero_state_dims({k: tensors[k] for k in CANONICAL_KEYS})
    if zero is not None:  # nothing to store: the sizes say it all
        tensors = {}
    tensors["tokens"] = _encode_tokens(tokens)
    if logits is not None:
        tensors["logits"] = _encode_logits(logits)
    meta = {
        "format": FORMAT_NAME, "format_version": "2" if zero is not None else "1",
        "model_fingerprint": str(fingerprint), "model_info": str(model_info),
        "storage_dtype": dtype_key, "token_count": str(len(tensors["tokens"])),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    if zero is not None:
        meta["zero_state"] = zero
    if extra:
        try:
            meta["extra"] = json.dumps(dict(extra), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StateError(f"extra metadata must be JSON-serialisable: {e}") from None
    meta["checksum"] = _checksum(meta, tensors)
    from safetensors.torch import save

    return save(tensors, metadata=meta)


def _encode_state_as(state: Mapping, storage_dtype) -> tuple[str, dict[str, torch.Tensor]]:
    if storage_dtype == QUANTIZED_STORAGE:
        return QUANTIZED_STORAGE, _quantize_state(state)
    dtype_key, dtype = _storage_dtype(storage_dtype)
    return dtype_key, _encode_state(state, dtype)


# ---- int8 storage ---------------------------------------------------------------------------
# Each row of the last dimension is cut into groups of head_size (N) values; a group is stored
# as int8 q with one float32 scale s = max|x| / 127, read back as q * s. Rows are C wide for
# the shifts and N wide for wkv, so N always divides them. Lossy: about 26% of fp32's bytes.
QUANTIZED_STORAGE = "int8"
SCALE_SUFFIX = ".scale"


def _groups(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group, group)


def _quantize_state(state: Mapping) -> dict[str, torch.Tensor]:
    dims = infer_dims(state)
    checked = validate_canonical(state, *dims)
    out = {}
    for name, t in checked.items():
        g = _groups(t.float(), dims[2])
        scale = g.abs().amax(dim=-1) / 127.0
        q = torch.round(g / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-127, 127)
        out[name] = q.to(torch.int8).reshape(t.shape).contiguous()
        out[name + SCALE_SUFFIX] = scale.contiguous()
    return out


def _dequantize_state(name, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state of an int8 file whose tensors passed _check_tensors."""
    out = {}
    for key in CANONICAL_KEYS:
        q, scale = tensors[key], tensors[key + SCALE_SUFFIX]
        group = q.shape[-1] // scale.shape[-1] if scale.dim() and scale.shape[-1] else 0
        if group < 1 or q.shape[-1] % group or tuple(scale.shape) != (*q.shape[:-1], q.shape[-1] // group):
            raise StateError(f"{name}: {key}{SCALE_SUFFIX} has shape {list(scale.shape)}, "
                             f"which does not group {key} {list(q.shape)}")  # fmt: skip
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise StateError(f"{name}: {key}{SCALE_SUFFIX} has negative, NaN or infinite values")
        out[key] = (_groups(q.float(), group) * scale.unsqueeze(-1)).reshape(q.shape)
    return out


def _zero_state_dims(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The `zero_state` metadata value (JSON sizes) if every state element is zero, else None."""
    if any(t.any() for t in tensors.values()):
        return None
    L, C, N = infer_dims(tensors)
    return json.dumps({"n_layer": L, "n_embd": C, "head_size": N}, sort_keys=True)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file next to the target, fsync, os.replace: readers see the old file or the new one."""
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise StateError(f"cannot write state file {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise StorageError(f"cannot write state file {path}: {e.strerror or e}") from e
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
            raise StorageError(f"cannot write state file {path}: {e.strerror or e}") from e
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


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Removes the temporary files interrupted writes left under `directory` (recursively);
    returns them. Only for a directory no writer is using, e.g. a server's at startup."""
    removed = []
    for root, _, names in os.walk(directory):
        for name in names:
            if _TEMP_NAME.fullmatch(name):
                path = Path(root) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


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


def _read_bytes(path: Path, cap: int) -> bytes:
    """The file's bytes; a file over `cap` bytes is refused before any of it is read."""
    if not path.exists():
        raise StateError(f"state file not found: {path}")
    if path.is_dir():
        raise StateError(f"{path} is a directory, not a state file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > cap:
                raise StateError(f"{path} is {size:,} bytes, more than a state file can be here ({cap:,}); not read")
            data = f.read(cap + 1)  # a file growing meanwhile is caught too
    except OSError as e:
        raise StorageError(f"cannot read state file {path}: {e.strerror or e}") from e
    if len(data) > cap:
        raise StateError(f"{path} is more than {cap:,} bytes, more than a state file can be here; not read")
    return data


def _parse(path: Path, cap: int = MAX_FILE_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(tensors, metadata, file size) of a safetensors file; StateError if it is not one."""
    return _parse_bytes(path, _read_bytes(path, cap))


def _parse_bytes(path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, TypeError, AttributeError, struct.error, RuntimeError, RecursionError) as e:
        raise StateError(f"{path} is truncated or not a safetensors state file ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise StateError(f"{path} is not a state file (its metadata is not a JSON object)")
    return tensors, {str(k): str(v) for k, v in meta.items()}, len(data)


def _check_header(path: Path, meta: Mapping[str, str]) -> None:
    """Format name, version and required keys: the checks that decide how to read the rest."""
    name = meta.get("format")
    if name != FORMAT_NAME:
        found = "no format name" if name is None else f"format {name!r}"
        raise StateError(f"{path} is a safetensors file but not an rwkvstate state file "
                         f"({found}, expected {FORMAT_NAME!r})")  # fmt: skip
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
        hint = "; it was written by a newer rwkvstate, upgrade to read it" if newer else ""
        raise StateError(f"{path}: state file format version {version!r} is not supported "
                         f"(this rwkvstate reads versions {', '.join(READABLE_VERSIONS)}){hint}")  # fmt: skip
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StateError(f"{path}: state file metadata is missing {missing}")


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """Names, dtypes and ranks, and their agreement with the metadata."""
    names = set(tensors)
    quantized = meta["storage_dtype"] == QUANTIZED_STORAGE
    stored = () if "zero_state" in meta else CANONICAL_KEYS
    scales = [k + SCALE_SUFFIX for k in stored] if quantized else []
    missing = [k for k in (*stored, *scales, "tokens") if k not in names]
    unknown = sorted(names - {*stored, *scales, "tokens", "logits"})
    if missing or unknown:
        raise StateError(f"{path}: state file tensors are wrong (missing {missing}, unexpected {unknown})")
    if meta["storage_dtype"] not in STORAGE_DTYPES and not quantized:
        raise StateError(f"{path}: unknown storage dtype {meta['storage_dtype']!r} (expected fp32, fp16, bf16 or int8)")
    dtype = torch.int8 if quantized else STORAGE_DTYPES[meta["storage_dtype"]]
    for key in stored:
        if tensors[key].dtype != dtype:
            raise StateError(f"{path}: {key} is {tensors[key].dtype}, but the file says {meta['storage_dtype']}")
    for key in scales:
        if tensors[key].dtype != torch.float32:
            raise StateError(f"{path}: {key} must be float32, got {tensors[key].dtype}")
    tokens = tensors["tokens"]
    if tokens.dtype != torch.int32 or tokens.dim() != 1:
        raise StateError(f"{path}: tokens must be int32 [n], got {tokens.dtype} {list(tokens.shape)}")
    if meta["token_count"] != str(tokens.numel()):
        raise StateError(f"{path}: metadata says {meta['token_count']} tokens, but the file holds {tokens.numel()}")
    logits = tensors.get("logits")
    if logits is not None and (logits.dtype != torch.float32 or logits.dim() != 1):
        raise StateError(f"{path}: logits must be float32 [vocab], got {logits.dtype} {list(logits.shape)}")


def _check_fingerprint(path: Path, meta: Mapping[str, str], fingerprint: str | None, model_info: str | None,
                       allow_other_weights: bool = False) -> None:  # fmt: skip
    """A fingerprint is `<architecture>:<weights>` (Model.fingerprint); files written before the
    weights part existed carry the architecture alone, and are checked on it alone."""
    if fingerprint is None or meta["model_fingerprint"] == fingerprint:
        return
    stored_arch, _, stored_weights = meta["model_fingerprint"].partition(":")
    arch, _, weights = str(fingerprint).partition(":")
    current = f" ({model_info})" if model_info else ""
    if stored_arch != arch:
        raise StateError(f"{path} was saved from a different model: file model fingerprint "
                         f"{meta['model_fingerprint']} ({meta['model_info']}), current model fingerprint "
                         f"{fingerprint}{current}")  # fmt: skip
    if stored_weights and weights and stored_weights != weights and not allow_other_weights:
        raise StateError(f"{path} was saved from a model of the same shape with other weights: the file's model is "
                         f"{meta['model_info']} (weights {stored_weights}), this one is {model_info or 'unnamed'} "
                         f"(weights {weights}); pass --allow-other-weights (allow_other_weights=True) to load it "
                         f"anyway")  # fmt: skip


def _check_state(path: Path, tensors, meta, layout: StateLayout | None) -> dict[str, torch.Tensor]:
    """Shapes (against layout if given, else self-consistent), finite values within
    MAX_STATE_ABS; float32 out. A zero-state file's sizes are checked the same way."""
    if "zero_state" in meta:
        return _zero_from_meta(path, meta["zero_state"], layout)
    state = {k: tensors[k] for k in CANONICAL_KEYS}
    try:
        dims = (layout.n_layer, layout.n_embd, layout.head_size) if layout is not None else infer_dims(state)
        return validate_canonical(state, *dims)
    except StateError as e:
        wrong_shape = layout is not None and "expected" in str(e)
        where = f" (the model needs n_layer={dims[0]}, n_embd={dims[1]}, head_size={dims[2]})" if wrong_shape else ""
        raise StateError(f"{path}: {e}{where}") from None


def _zero_from_meta(path: Path, text: str, layout: StateLayout | None) -> dict[str, torch.Tensor]:
    try:
        dims = json.loads(text)
        L, C, N = (dims[k] for k in ("n_layer", "n_embd", "head_size"))
        if not all(type(v) is int and v > 0 for v in (L, C, N)) or C % N:
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise StateError(f"{path}: metadata zero_state is not n_layer, n_embd and head_size sizes: {text[:80]!r}") from None
    if layout is not None and (L, C, N) != (layout.n_layer, layout.n_embd, layout.head_size):
        raise StateError(f"{path}: the zero state has n_layer={L}, n_embd={C}, head_size={N} (the model needs "
                         f"n_layer={layout.n_layer}, n_embd={layout.n_embd}, head_size={layout.head_size})")  # fmt: skip
    if L * (N + 2) * C > _MAX_ZERO_NUMEL:
        raise StateError(f"{path}: a zero state of n_layer={L}, n_embd={C}, head_size={N} is implausibly large")
    return zero_state(L, C, N)


def _check_tokens_logits(path: Path, tensors, tokens: list[int], vocab_size: int | None) -> None:
    logits = tensors.get("logits")
    if logits is not None:
        if vocab_size is not None and logits.numel() != vocab_size:
            raise StateError(f"{path}: logits have {logits.numel()} entries, the model's vocab is {vocab_size}")
        if not torch.isfinite(logits).all():
            raise StateError(f"{path}: logits have NaN or infinite values")
        vocab_size = logits.numel()
    top = vocab_size if vocab_size is not None else _INT32_MAX + 1
    try:
        check_token_ids(tokens, top)
    except ValueError as e:
        raise StateError(f"{path}: {e}") from None


def _check_extra(path: Path, meta: Mapping[str, str]) -> dict:
    try:
        extra = json.loads(meta["extra"]) if "extra" in meta else {}
    except (ValueError, RecursionError):
        raise StateError(f"{path}: metadata 'extra' is not valid JSON") from None
    if not isinstance(extra, dict):
        raise StateError(f"{path}: metadata 'extra' must be a JSON object, got {type(extra).__name__}")
    return extra


def _validate(path, tensors, meta, fingerprint=None, model_info=None, layout=None, vocab_size=None,
              allow_other_weights=False) -> StateFile:  # fmt: skip
    _check_header(path, meta)
    if _checksum(meta, tensors) != meta["checksum"]:
        raise StateError(f"{path}: checksum mismatch: the file was modified or corrupted")
    _check_fingerprint(path, meta, fingerprint, model_info, allow_other_weights)
    _check_tensors(path, tensors, meta)
    if meta["storage_dtype"] == QUANTIZED_STORAGE and "zero_state" not in meta:
        tensors = {**tensors, **_dequantize_state(path, tensors)}
    state = _check_state(path, tensors, meta, layout)
    tokens = tensors["tokens"].tolist()
    _check_tokens_logits(path, tensors, tokens, vocab_size)
    extra = _check_extra(path, meta)
    logits = tensors.get("logits")
    return StateFile(state, tokens, None if logits is None else logits.clone(), dict(meta), extra, "zero_state" in meta)


def read_state_file(
    path, *, fingerprint: str | None = None, layout: StateLayout | None = None,
    vocab_size: int | None = None, model_info: str | None = None, allow_other_weights: bool = False,
    max_bytes: int | None = None,
) -> StateFile:  # fmt: skip
    """Reads and fully validates a state file; every failure is a one-line StateError naming path
    (StorageError when the file cannot be read at all).

    Checks, in order: the file's size against max_bytes (default: max_file_bytes(layout,
    vocab_size)) before reading it; it is a complete safetensors file; format name; format
    version; checksum; the model fingerprint (if given; model_info names the current model in
    the message; other weights of the same architecture only with allow_other_weights); tensor
    names, dtypes and token count; state shapes (against layout if given); finite values within
    MAX_STATE_ABS; token ids and logits length against vocab_size (or the stored logits' length
    when vocab_size is not given); `extra` is a JSON object.
    """
    path = Path(path)
    cap = max_file_bytes(layout, vocab_size) if max_bytes is None else max_bytes
    tensors, meta, _ = _parse(path, cap)
    return _validate(path, tensors, meta, fingerprint, model_info, layout, vocab_size, allow_other_weights)


def decode_state_file(
    data: bytes, *, name: str = "state blob", fingerprint: str | None = None, layout: StateLayout | None = None,
    vocab_size: int | None = None, model_info: str | None = None, allow_other_weights: bool = False,
    max_bytes: int | None = None,
) -> StateFile:  # fmt: skip
    """read_state_file for the bytes of a state file (from a store that is not a file system);
    messages name it `name`."""
    cap = max_file_bytes(layout, vocab_size) if max_bytes is None else max_bytes
    if len(data) > cap:
        raise StateError(f"{name} is {len(data):,} bytes, more than a state file can be here ({cap:,}); not read")
    tensors, meta, _ = _parse_bytes(name, bytes(data))
    return _validate(name, tensors, meta, fingerprint, model_info, layout, vocab_size, allow_other_weights)


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
