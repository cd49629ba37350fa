"""Conversions between the canonical RWKV-7 state and other runtimes' state formats.

Canonical state (see docs/state-formats.md): a dict of float32 CPU tensors

    att_shift [L, C]        time-mix token shift: last token's LayerNorm(ln1) output
    wkv       [L, H, N, N]  wkv[l, h, i, j] = S_h[value i, key j]
    ffn_shift [L, C]        channel-mix token shift: last token's LayerNorm(ln2) output

with C = H * N. Everything here is a pure function of tensors: no pool, slot or model
knowledge, so other modules can build on it freely.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import StateError, first_line
from .layout import CANONICAL_KEYS, MAX_STATE_ABS, state_dims, state_shapes

# Orientations of a state-tuning `time_state[h, a, b]` (see docs/state-formats.md):
# RWKV-PEFT saves (value, key), the canonical order; web-rwkv's converters
# (ai00, RWKV-Runner, web-rwkv-converter) transpose it to (key, value) in `.st` files.
VALUE_KEY = "value_key"
KEY_VALUE = "key_value"
_TIME_STATE_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


def zero_state(n_layer: int, n_embd: int, head_size: int) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.float32) for k, s in state_shapes(n_layer, n_embd, head_size).items()}


def _as_float32(name: str, value) -> torch.Tensor:
    """float32, CPU, contiguous; other real dtypes are converted, as the format promises."""
    try:
        t = torch.as_tensor(value)
    except Exception as e:  # lists of mixed junk, arbitrary objects
        raise StateError(f"{name} is not a tensor ({type(value).__name__}): {e}") from None
    if t.is_complex():
        raise StateError(f"{name} has complex dtype {t.dtype}; a state is real-valued")
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _check_values(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise StateError(f"{name} has {int(bad.sum())} non-finite values (first at index {first})")
    if t.numel() and (peak := float(t.abs().max())) > MAX_STATE_ABS:
        first = tuple(int(i) for i in (t.abs() > MAX_STATE_ABS).nonzero()[0])
        raise StateError(f"{name} has values up to {peak:.4g} in magnitude (first at index {first}), beyond the "
                         f"bound of {MAX_STATE_ABS:.0f} for a state element: the state is damaged")  # fmt: skip


def validate_canonical(state: Mapping, n_layer: int, n_embd: int, head_size: int) -> dict[str, torch.Tensor]:
    """Check a canonical state for a model of these sizes; return it as float32 CPU tensors.

    Raises StateError (a ValueError) naming the problem: not a dict, a missing or unknown
    key, a shape that differs from the expected one, NaN/inf values, or values beyond
    MAX_STATE_ABS in magnitude. Tensors that already
    are float32, CPU and contiguous are returned as is (shared, not copied).
    """
    if not isinstance(state, Mapping):
        raise StateError(f"a state must be a dict with keys {list(CANONICAL_KEYS)}, got {type(state).__name__}")
    missing = [k for k in CANONICAL_KEYS if k not in state]
    if missing:
        raise StateError(f"state is missing key(s) {missing}; expected keys {list(CANONICAL_KEYS)}")
    unknown = sorted(str(k) for k in state if k not in CANONICAL_KEYS)
    if unknown:
        raise StateError(f"state has unknown key(s) {unknown}; expected keys {list(CANONICAL_KEYS)}")
    out = {}
    sizes = f"n_layer={n_layer}, n_embd={n_embd}, head_size={head_size}"
    for key, shape in state_shapes(n_layer, n_embd, head_size).items():
        t = _as_float32(f"state['{key}']", state[key])
        if tuple(t.shape) != shape:
            raise StateError(f"state['{key}'] has shape {tuple(t.shape)}, expected {shape} ({sizes})")
        _check_values(f"state['{key}']", t)
        out[key] = t
    return out


def infer_dims(state: Mapping) -> tuple[int, int, int]:
    """(n_layer, n_embd, head_size) implied by state['wkv'], for callers that know no model."""
    if not isinstance(state, Mapping) or "wkv" not in state:
        raise StateError(f"a state must be a dict with keys {list(CANONICAL_KEYS)}")
    shape = tuple(_as_float32("state['wkv']", state["wkv"]).shape)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise StateError(f"state['wkv'] has shape {shape}, expected [L, H, N, N]")
    L, H, N, _ = shape
    return L, H * N, N


# --- official `rwkv` pip package (RWKV_x070): list of 3L tensors ---------------------------


def to_rwkv_list(state: Mapping, *, device="cpu", shift_dtype=torch.float32) -> list[torch.Tensor]:
    """[att x_prev [C], wkv [H, N, N], ffn x_prev [C]] per layer, as RWKV_x070 keeps its state.

    Both wkv orders are (value, key), so wkv passes through unchanged. The wkv stays float32
    like the package's own generate_zero_state; shift_dtype should match the strategy's
    activation dtype (fp16/bf16 on GPU). Tensors are fresh copies: the package's CUDA path
    updates the wkv in place, which must not reach our dict.
    """
    s = validate_canonical(state, *infer_dims(state))
    out = []
    for l in range(s["wkv"].shape[0]):
        out += [
            s["att_shift"][l].to(device=device, dtype=shift_dtype, copy=True),
            s["wkv"][l].to(device=device, dtype=torch.float32, copy=True),
            s["ffn_shift"][l].to(device=device, dtype=shift_dtype, copy=True),
        ]
    return out


def from_rwkv_list(lst: Sequence[torch.Tensor], head_size: int) -> dict[str, torch.Tensor]:
    """Inverse of to_rwkv_list; sizes are read off the list and checked for consistency."""
    if not isinstance(lst, Sequence) or len(lst) == 0 or len(lst) % 3:
        n = len(lst) if isinstance(lst, Sequence) else type(lst).__name__
        raise StateError(f"an rwkv package state is a list of 3 tensors per layer, got {n}")
    n_layer, n_embd = len(lst) // 3, torch.as_tensor(lst[0]).numel()
    L, H, N, C = state_dims(n_layer, n_embd, head_size)
    parts = {k: [torch.as_tensor(lst[3 * l + i]) for l in range(L)] for i, k in enumerate(CANONICAL_KEYS)}
    want = {"att_shift": (C,), "wkv": (H, N, N), "ffn_shift": (C,)}
    for key, tensors in parts.items():
        for l, t in enumerate(tensors):
            if tuple(t.shape) != want[key]:
                raise StateError(f"rwkv state[{3 * l + CANONICAL_KEYS.index(key)}] ({key} of layer {l}) has shape "
                                 f"{tuple(t.shape)}, expected {want[key]}")  # fmt: skip
    stacked = {k: torch.stack([_as_float32(k, t) for t in ts]) for k, ts in parts.items()}
    return validate_canonical(stacked, L, C, N)


# --- web-rwkv v7 backed state -----------------------------------------------------------------
# web-rwkv writes shapes fastest-dimension-first; its backed v7 state is [C, N+2, L, 1]
# (runtime/v7.rs: State::init_shape, back(), load()). The row-major torch tensor with the same
# memory is [L, N+2, C]: element [l, r, c] sits at flat offset c + C*(r + (N+2)*l).
# Row 0 = att shift, rows 1..N = wkv with [l, 1+j, h*N+i] = S_h[value i, key j], row N+1 = ffn
# shift (shaders/time_mix_v7.wgsl reads row `j*4+1..` for key j, column `index` for value i).


def to_web_rwkv(state: Mapping) -> torch.Tensor:
    """Canonical -> float32 torch tensor [L, N+2, C] (= web-rwkv backed [C, N+2, L, 1]).

    `.flatten()` of the result is exactly the data web-rwkv's State::load expects.
    """
    s = validate_canonical(state, *infer_dims(state))
    L, H, N, _ = s["wkv"].shape
    # [L, H, i, j] -> [L, j, H, i] -> [L, N, C]: one row per key, columns head-major by value.
    rows = s["wkv"].permute(0, 3, 1, 2).reshape(L, N, H * N)
    return torch.cat([s["att_shift"][:, None], rows, s["ffn_shift"][:, None]], dim=1).contiguous()


def from_web_rwkv(t, n_layer: int, n_embd: int, head_size: int) -> dict[str, torch.Tensor]:
    """Inverse of to_web_rwkv. Accepts [L, N+2, C], web-rwkv's full [1, L, N+2, C], or the
    flat buffer of L*(N+2)*C floats as read back from the GPU."""
    L, H, N, C = state_dims(n_layer, n_embd, head_size)
    t = _as_float32("web-rwkv state", t).clone()  # the result must not alias the caller's buffer
    shape = (L, N + 2, C)
    if (t.dim() == 1 and t.numel() == L * (N + 2) * C) or tuple(t.shape) == (1, *shape):
        t = t.reshape(shape)
    if tuple(t.shape) != shape:
        raise StateError(f"web-rwkv state has torch shape {tuple(t.shape)}, expected {shape} "
                         f"(web-rwkv [{C}, {N + 2}, {L}])")  # fmt: skip
    wkv = t[:, 1 : N + 1].reshape(L, N, H, N).permute(0, 2, 3, 1)  # [L, j, H, i] -> [L, H, i, j]
    return validate_canonical({"att_shift": t[:, 0], "wkv": wkv, "ffn_shift": t[:, N + 1]}, L, C, N)


# --- RWKV-7 state-tuning files (blocks.{l}.att.time_state [H, N, N]) ---------------------------


def from_state_tuning(
    tensors: Mapping, n_layer: int, n_embd: int, head_size: int, *, orientation: str = VALUE_KEY
) -> dict[str, torch.Tensor]:
    """Canonical state from a loaded state-tuning dict: zero shifts, wkv from time_state.

    orientation: VALUE_KEY for files as RWKV-PEFT saves them (`.pth`); KEY_VALUE for
    `.st` files made by web-rwkv's converter, which transposes time_state. Keys other than
    time_state are ignored; missing, surplus or mis-shaped layers raise StateError.
    """
    if orientation not in (VALUE_KEY, KEY_VALUE):
        raise StateError(f"orientation must be {VALUE_KEY!r} or {KEY_VALUE!r}, got {orientation!r}")
    L, H, N, C = state_dims(n_layer, n_embd, head_size)
    found = {int(m[1]): k for k in tensors if isinstance(k, str) and (m := _TIME_STATE_KEY.match(k))}
    if not found:
        raise StateError("no blocks.{l}.att.time_state tensors found: not an RWKV state-tuning file")
    missing, surplus = sorted(set(range(L)) - set(found)), sorted(set(found) - set(range(L)))
    if missing or surplus:
        raise StateError(f"state-tuning file has time_state for layers {sorted(found)}, but the model "
                         f"has {L} layers (missing {missing}, surplus {surplus})")  # fmt: skip
    wkv = []
    for l in range(L):
        t = _as_float32(found[l], tensors[found[l]])
        if tuple(t.shape) != (H, N, N):
            raise StateError(f"{found[l]} has shape {tuple(t.shape)}, expected {(H, N, N)} "
                             f"(n_embd={C}, head_size={N})")  # fmt: skip
        wkv.append(t if orientation == VALUE_KEY else t.transpose(-1, -2))
    zeros = torch.zeros(L, C)
    return validate_canonical({"att_shift": zeros, "wkv": torch.stack(wkv), "ffn_shift": zeros.clone()}, L, C, N)


def load_state_tuning_file(
    path, n_layer: int, n_embd: int, head_size: int, *, orientation: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a `.pth`, `.safetensors` or web-rwkv `.st` state-tuning file into a canonical state.

    The container is recognised by content (a zip archive is a torch file, read with
    `weights_only=True`; anything else must be safetensors), so a misnamed file still gets a
    precise message. orientation defaults by suffix: `.st` (web-rwkv converter output) is
    KEY_VALUE, anything else VALUE_KEY. Any failure becomes a one-line StateError, and none
    of them suggests loading the file unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file not found: {path}" if not path.exists() else f"{path} is not a file")
    tensors = _read_torch_state(path) if zipfile.is_zipfile(path) else _read_safetensors_state(path)
    if not isinstance(tensors, Mapping):
        raise StateError(f"state-tuning file {path} holds a {type(tensors).__name__}, not a dict of tensors")
    if orientation is None:
        orientation = KEY_VALUE if path.suffix.lower() == ".st" else VALUE_KEY
    return from_state_tuning(tensors, n_layer, n_embd, head_size, orientation=orientation)


def _read_torch_state(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message goes on to advise weights_only=False: never relay that
        raise StateError(f"{path} holds Python objects other than tensors; only plain tensor files are "
                         "read (state-tuning .pth files are)") from None  # fmt: skip
    except Exception as e:
        raise StateError(f"cannot read {path} as a PyTorch file (truncated?): "
                         f"{type(e).__name__}: {first_line(e, 'no details')}") from None  # fmt: skip


def _read_safetensors_state(path: Path):
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise StateError(f"{path} is neither a PyTorch (.pth) nor a safetensors state file: "
                         f"{type(e).__name__}: {first_line(e, 'no details')}") from None  # fmt: skip
