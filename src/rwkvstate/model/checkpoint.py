"""Loading and validating RWKV-7 checkpoints (official BlinkDL key names).

`.pth` files are read with `torch.load(weights_only=True, mmap=True)`, never a
plain unpickle; `.safetensors` files with safetensors. Every failure becomes a
CheckpointError with one line naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, first_line

# Keys that mark older RWKV generations, checked in order (a v6 file also has v5-like keys).
_VERSION_MARKERS = (
    ("RWKV-6", ("att.time_maa_x", "att.time_decay_w1")),
    ("RWKV-5", ("att.time_faaaa",)),
    ("RWKV-4", ("att.time_first",)),
)
_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Per-layer tensors: name -> shape as a function of (C, H, N, F, ranks). Vectors of C
# elements are stored as [1, 1, C] in official files; any shape that squeezes to [C] is accepted.
_VECTORS = (
    "ln1.weight ln1.bias ln2.weight ln2.bias att.x_r att.x_w att.x_k att.x_v att.x_a att.x_g "
    "att.w0 att.a0 att.k_k att.k_a att.ln_x.weight att.ln_x.bias ffn.x_k"
).split()
_LAYER0_OPTIONAL = {"att.v0", "att.v1", "att.v2"}  # present in layer 0 of released files, unused


def layer_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    C, H, N, F = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {name: (C,) for name in _VECTORS}
    shapes.update(
        {
            "att.w1": (C, cfg.decay_rank), "att.w2": (cfg.decay_rank, C),
            "att.a1": (C, cfg.aaa_rank), "att.a2": (cfg.aaa_rank, C),
            "att.g1": (C, cfg.gate_rank), "att.g2": (cfg.gate_rank, C),
            "att.r_k": (H, N),
            "att.receptance.weight": (C, C), "att.key.weight": (C, C),
            "att.value.weight": (C, C), "att.output.weight": (C, C),
            "ffn.key.weight": (F, C), "ffn.value.weight": (C, F),
        }
    )  # fmt: skip
    if layer > 0:
        shapes.update({"att.v0": (C,), "att.v1": (C, cfg.mv_rank), "att.v2": (cfg.mv_rank, C)})
    return shapes


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {
        "emb.weight": (V, C), "head.weight": (V, C),
        "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,), "ln_out.bias": (C,),
    }  # fmt: skip
    for layer in range(cfg.n_layer):
        for name, shape in layer_shapes(cfg, layer).items():
            shapes[f"blocks.{layer}.{name}"] = shape
    return shapes


def fingerprint(cfg: ModelConfig) -> str:
    """32 hex digits identifying a model's architecture: config sizes and weight names/shapes.

    Dtype- and device-independent (the same checkpoint in fp16 or fp32 gives the same value).
    Two checkpoints of identical shapes share it; weights_digest tells them apart.
    """
    names = ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim",
             "decay_rank", "aaa_rank", "mv_rank", "gate_rank")  # fmt: skip
    sizes = {k: int(getattr(cfg, k)) for k in names}
    weights = sorted([name, list(shape)] for name, shape in weight_shapes(cfg).items())
    text = json.dumps({"config": sizes, "weights": weights}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"rwkvstate-model-v1\0" + text.encode()).hexdigest()[:32]


WEIGHT_SAMPLES = 256  # elements sampled from each tensor for weights_digest


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits identifying a checkpoint's weights, cheaply (a few KB read per tensor).

    sha256 over "rwkvstate-weights-v1\\0", then, for every tensor in name order: its name, its
    shape, and the little-endian float32 bytes of WEIGHT_SAMPLES elements at the flat indices
    i * numel // WEIGHT_SAMPLES (i = 0..WEIGHT_SAMPLES-1; every element of a smaller tensor),
    each item length-prefixed. Float32 values make it independent of the file's dtype when the
    values are the same (a bf16 file and its exact fp32 copy agree) and of the compute dtype
    and device; a fine-tune, which moves nearly every weight, gets another digest.
    """
    h = hashlib.sha256(b"rwkvstate-weights-v1\0")

    def put(item: bytes) -> None:
        h.update(len(item).to_bytes(8, "little"))
        h.update(item)

    for name in sorted(tensors):
        t = tensors[name]
        flat = t.detach().reshape(-1)
        n = flat.numel()
        index = torch.arange(n) if n <= WEIGHT_SAMPLES else torch.arange(WEIGHT_SAMPLES) * n // WEIGHT_SAMPLES
        put(name.encode())
        put(json.dumps(list(t.shape)).encode())
        put(flat[index.to(flat.device)].to(device="cpu", dtype=torch.float32).numpy().astype("<f4").tobytes())
    return h.hexdigest()[:16]


# ---- reading files ------------------------------------------------------------------------


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a flat name -> tensor dict from a .pth or .safetensors file (lazily where possible)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"model path is a directory, expected a .pth or .safetensors file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"model file is empty: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_pth(path)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix == ".pth":
        return False
    with open(path, "rb") as f:  # no suffix to go by: a zip (torch) file starts with "PK"
        return f.read(2) != b"PK"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated or corrupt?): {first_line(e)}")


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint (no zip archive found; the file may be truncated, "
            "or saved in the legacy non-zip format, which is not supported)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path.name} holds Python objects other than plain tensors, refused by the safe loader "
            f"(weights_only=True){_refused_global(e)}"
        )
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path.name} could not be read as a PyTorch checkpoint (truncated?): {first_line(e)}")
    return _flat_tensor_dict(data, path.name)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _refused_global(e: BaseException) -> str:
    """The line of torch's refusal that names the offending global, without its advice."""
    for line in _ANSI.sub("", str(e)).splitlines():
        if "global" in line.lower() and ("unsupported" in line.lower() or "GLOBAL" in line):
            return ": " + line.strip()[:200]
    return ""


def _flat_tensor_dict(data, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise CheckpointError(f"{name} does not hold a dict of tensors (found {type(data).__name__})")
    for key, value in data.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{name} is not a flat dict of tensors: key {key!r} is not a string")
        if not torch.is_tensor(value):
            kind = type(value).__name__
            raise CheckpointError(f"{name} is not a flat dict of tensors: entry {key!r} is a {kind}")
    return data


# ---- inferring and validating --------------------------------------------------------------


def detect_version(tensors: dict[str, torch.Tensor]) -> str:
    """'RWKV-7', or the older generation the keys look like; CheckpointError if not RWKV at all."""
    suffixes = {m.group(2) for m in map(_LAYER_KEY.match, tensors) if m}
    if "att.r_k" in suffixes or "att.x_r" in suffixes:
        return "RWKV-7"
    for version, markers in _VERSION_MARKERS:
        if any(marker in suffixes for marker in markers):
            return version
    if "emb.weight" not in tensors:
        raise CheckpointError("not an RWKV checkpoint: it has no 'emb.weight' and no 'blocks.N.*' tensors")
    raise CheckpointError("not an RWKV-7 checkpoint: it has no 'blocks.0.att.r_k' and matches no known RWKV version")


def infer_config(tensors: dict[str, torch.Tensor], tokenizer: str | None = None) -> ModelConfig:
    """Reads every size from tensor shapes. Assumes detect_version() said RWKV-7."""
    layers = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, tensors) if m})
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise CheckpointError(f"checkpoint skips layer(s) {missing}: blocks must be numbered 0..n_layer-1")

    def dim(key: str, axis: int) -> int:
        if key not in tensors:
            raise CheckpointError(f"missing tensor '{key}'")
        shape = tensors[key].shape
        if len(shape) != 2:
            raise CheckpointError(f"'{key}': expected a 2-D tensor, found shape {list(shape)}")
        return shape[axis]

    vocab_size, n_embd = dim("emb.weight", 0), dim("emb.weight", 1)
    n_head, head_size = dim("blocks.0.att.r_k", 0), dim("blocks.0.att.r_k", 1)
    if n_head * head_size != n_embd:
        raise CheckpointError(
            f"'blocks.0.att.r_k' has shape {[n_head, head_size]}, but n_head * head_size must equal n_embd {n_embd}"
        )
    # layer 0 takes no value-residual LoRA; its optional v1 (if any) still tells the rank
    mv_key = "blocks.1.att.v1" if len(layers) > 1 else "blocks.0.att.v1"
    mv_rank = dim(mv_key, 1) if len(layers) > 1 or mv_key in tensors else 1
    if tokenizer is None:
        from ..tokenizer import infer_tokenizer_kind

        try:
            tokenizer = infer_tokenizer_kind(vocab_size)
        except ValueError as e:
            raise CheckpointError(str(e))
    return ModelConfig(
        n_layer=len(layers), n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
        ffn_dim=dim("blocks.0.ffn.key.weight", 0),
        decay_rank=dim("blocks.0.att.w1", 1), aaa_rank=dim("blocks.0.att.a1", 1),
        mv_rank=mv_rank, gate_rank=dim("blocks.0.att.g1", 1), tokenizer=tokenizer,
    )  # fmt: skip


def validate(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every expected tensor exists with its shape and a float dtype; no unknown tensors."""
    expected = weight_shapes(cfg)
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"missing tensor '{key}' (expected shape {list(shape)})")
        found = tensors[key]
        fits = found.squeeze().shape == shape if len(shape) == 1 else found.shape == shape
        if not fits:
            raise CheckpointError(f"'{key}': expected shape {list(shape)}, found {list(found.shape)}")
        if not found.is_floating_point():
            raise CheckpointError(f"'{key}': expected a floating-point tensor, found {found.dtype}")
    optional = {f"blocks.0.{name}" for name in _LAYER0_OPTIONAL}
    unknown = sorted(set(tensors) - set(expected) - optional)
    if unknown:
        shown = ", ".join(unknown[:4]) + (" ..." if len(unknown) > 4 else "")
        raise CheckpointError(f"unexpected tensors for a plain RWKV-7 model ({len(unknown)}): {shown}")


def read_sidecar(path: str | Path) -> dict:
    """The optional `<model>.json` beside a model file (e.g. {"tokenizer": "bytes"})."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.exists():
        return {}
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"model sidecar {sidecar.name} is not valid JSON: {first_line(e)}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"model sidecar {sidecar.name} must hold a JSON object")
    if "tokenizer" in meta and meta["tokenizer"] not in ("world", "bytes"):
        raise CheckpointError(f"model sidecar {sidecar.name}: tokenizer must be 'world' or 'bytes'")
    return meta


def load_checkpoint(path: str | Path, tokenizer: str | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Reads, identifies and validates a checkpoint; returns its tensors (CPU) and config.

    The tokenizer kind comes from the argument, else the sidecar, else the vocab size.
    """
    tensors = read_tensors(path)
    version = detect_version(tensors)
    if version != "RWKV-7":
        raise CheckpointError(f"{Path(path).name} looks like an {version} checkpoint; only RWKV-7 is supported")
    cfg = infer_config(tensors, tokenizer or read_sidecar(path).get("tokenizer"))
    validate(tensors, cfg)
    return tensors, cfg
