"""Per-group symmetric quantisation of a flat float tensor (compressed state snapshots).

The input is cut into contiguous groups of `group` elements. Per group (ops/README.md):

    amax  = max |x|                                      float32
    scale = smallest float16 >= min(amax / QMAX, 65504)  QMAX = 127 (int8) or 448 (fp8 e4m3)
    q     = 0                                            if scale == 0 (amax / QMAX == 0: all zeros)
            clamp(floor(x / scale + 0.5), -127, 127)     int8
            e4m3(clamp(x / scale, -448, 448))            fp8, rounded to nearest even
    x'    = float32(q) * float32(scale)                  then rounded to the output dtype

The quantiser divides by the float16 scale it stores, so encode and decode agree exactly, and
rounding the scale up keeps |x| / scale <= QMAX: the int8 error is at most scale / 2 per element
even where the scale is a float16 subnormal. Both backends compute the same operations in the
same order with correctly rounded division, so they agree bit for bit. Non-finite inputs are not
supported (a NaN or inf makes its group's output meaningless).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, is_interpreting, pick_backend, tl, triton

QMAX = {"int8": 127.0, "fp8": 448.0}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP16_MAX = 65504.0
MAX_TRITON_GROUP = 8192  # a program holds at least one whole group in registers


def fp8_supported(device) -> bool:
    """Whether fp8 snapshots work on device: CPU through torch; CUDA through the Triton kernel,
    which needs e4m3 conversions in hardware (compute capability 8.9 or newer)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return HAS_TRITON and torch.cuda.get_device_capability(device) >= (8, 9)
    return False


# ---- torch reference ---------------------------------------------------------------------------
def _scale_reference(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """float32 amax [G] -> float16 scales [G]: the smallest float16 >= min(amax / qmax, fp16 max)."""
    # a tensor divisor: CUDA torch multiplies by the reciprocal of a Python-scalar divisor, which
    # is not the correctly rounded quotient the kernel computes
    s = (amax / torch.full_like(amax, qmax)).clamp_(max=FP16_MAX)
    h = s.half()
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(h.float() < s, up, h)


def quantize_groups_reference(src: torch.Tensor, group: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """src [numel] float -> (q [numel] int8 or float8_e4m3fn, scales [numel // group] float16)."""
    qmax = QMAX[kind]
    x = src.reshape(-1, group).float()
    scales = _scale_reference(x.abs().amax(1), qmax)
    s = scales.float()[:, None]
    y = torch.where(s > 0, x / s, 0.0)
    if kind == "int8":
        q = torch.floor(y + 0.5).clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn)
    return q.view(-1), scales


def dequantize_groups_reference(q: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """q [numel], scales [numel // group] float16 -> [numel] in dtype (float32 product, one rounding)."""
    x = q.reshape(-1, group).float() * scales.float()[:, None]
    return x.to(dtype).view(-1)


# ---- Triton ------------------------------------------------------------------------------------
# Grid (cdiv(num_groups, BLOCK_G),): a program owns groups o_g = i_g*BLOCK_G .. +BLOCK_G-1 as a
# [BLOCK_G, GROUP] tile (GROUP = next power of two >= GROUP_SIZE; masked columns load 0, which
# leaves amax unchanged, and are not stored). It reads its elements once, writes each q and
# scale once; no two programs share an element, so there are no races.
if HAS_TRITON:
    from .wkv7 import _round_nearest  # float32 -> fp16/bf16 to nearest, also in the interpreter

    @triton.jit
    def _scale_fp16(amax, QMAX: tl.constexpr):
        """Triton twin of _scale_reference (div_rn: the plain fp32 `/` is not correctly rounded)."""
        s = tl.minimum(tl.math.div_rn(amax, QMAX), 65504.0)
        h = s.to(tl.float16)
        up = (h.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        return tl.where(h.to(tl.float32) < s, up, h)

    @triton.jit
    def _round_e4m3(y):
        """float32 y, |y| <= 448 -> the nearest e4m3 value (ties to even), still as float32, so
        the cast to fp8 afterwards is exact. Done by hand because the CPU interpreter's fp8 cast
        does not round to nearest. Adding and subtracting M = 2^(max(e, -6) + 20), e = exponent
        of y, leaves ulp(M) = 2^(max(e, -6) - 3) = the e4m3 spacing at y (the floor -6 is the
        subnormal range), and fp32 addition rounds to nearest even."""
        bits = y.to(tl.int32, bitcast=True)
        e = (bits >> 23) & 0xFF
        m = ((tl.maximum(e, 127 - 6) + 20) << 23).to(tl.float32, bitcast=True)
        r = (tl.abs(y) + m) - m
        return tl.where(bits < 0, -r, r)  # the sign bit of y, also for -0 and values rounding to 0

    @triton.jit
    def _quantize_kernel(
        x, q, scales, num_groups,
        GROUP_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, QMAX: tl.constexpr,
        IS_FP8: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        i_g = tl.program_id(0)
        o_g = i_g * BLOCK_G + tl.arange(0, BLOCK_G)
        o_e = tl.arange(0, GROUP)
        m_g = o_g < num_groups
        m_x = m_g[:, None] & (o_e < GROUP_SIZE)[None, :]
        o_x = o_g.to(tl.int64)[:, None] * GROUP_SIZE + o_e[None, :]
        b_x = tl.load(x + o_x, mask=m_x, other=0).to(tl.float32)
        b_h = _scale_fp16(tl.max(tl.abs(b_x), axis=1), QMAX)
        tl.store(scales + o_g, b_h, mask=m_g)
        b_s = b_h.to(tl.float32)[:, None]
        b_y = tl.where(b_s > 0, tl.math.div_rn(b_x, tl.where(b_s > 0, b_s, 1.0)), 0.0)
        if IS_FP8:
            b_y = tl.minimum(tl.maximum(b_y, -QMAX), QMAX)
            if INTERPRET:  # the interpreter's fp8 cast does not round to nearest: round first
                b_q = _round_e4m3(b_y).to(tl.float8e4nv)
            else:  # the hardware conversion rounds to nearest even
                b_q = b_y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        else:
            b_q = tl.minimum(tl.maximum(tl.floor(b_y + 0.5), -QMAX), QMAX).to(tl.int8)
        tl.store(q + o_x, b_q, mask=m_x)

    @triton.jit
    def _dequantize_kernel(
        q, scales, out, num_groups, GROUP_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr
    ):
        i_g = tl.program_id(0)
        o_g = i_g * BLOCK_G + tl.arange(0, BLOCK_G)
        o_e = tl.arange(0, GROUP)
        m_g = o_g < num_groups
        m_x = m_g[:, None] & (o_e < GROUP_SIZE)[None, :]
        o_x = o_g.to(tl.int64)[:, None] * GROUP_SIZE + o_e[None, :]
        b_s = tl.load(scales + o_g, mask=m_g, other=0).to(tl.float32)
        b_x = tl.load(q + o_x, mask=m_x).to(tl.float32) * b_s[:, None]  # masked lanes are not stored
        tl.store(out + o_x, _round_nearest(b_x, out.dtype.element_ty), mask=m_x)


def _launch_config(group: int, block_g: int | None) -> tuple[int, int]:
    """(GROUP, BLOCK_G): tiles of about 4096 elements (32 per thread at 4 warps), at least one group."""
    if group > MAX_TRITON_GROUP:
        raise ValueError(f"the Triton kernels take groups of at most {MAX_TRITON_GROUP} elements, got {group}; "
                         "use backend='torch'")  # fmt: skip
    group_p2 = triton.next_power_of_2(group)
    return group_p2, block_g or max(4096 // group_p2, 1)


def quantize_groups_triton(src, group, kind, q, scales, block_g=None) -> None:
    """Writes q and scales (contiguous, checked by the caller) from contiguous src."""
    num_groups = scales.numel()
    group_p2, block_g = _launch_config(group, block_g)
    _quantize_kernel[(triton.cdiv(num_groups, block_g),)](
        src, q, scales, num_groups,
        GROUP_SIZE=group, GROUP=group_p2, BLOCK_G=block_g, QMAX=QMAX[kind], IS_FP8=kind == "fp8", INTERPRET=is_interpreting(),
        num_warps=4,
    )  # fmt: skip


def dequantize_groups_triton(q, scales, group, out, block_g=None) -> None:
    num_groups = scales.numel()
    group_p2, block_g = _launch_config(group, block_g)
    _dequantize_kernel[(triton.cdiv(num_groups, block_g),)](
        q, scales, out, num_groups, GROUP_SIZE=group, GROUP=group_p2, BLOCK_G=block_g, num_warps=4
    )


# ---- public functions --------------------------------------------------------------------------
def _check_flat(t: torch.Tensor, name: str, dtypes, numel: int, device) -> torch.Tensor:
    """A contiguous tensor of the right dtype, size and device, flattened to 1-D (a view)."""
    if t.dtype not in dtypes or t.numel() != numel or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {' or '.join(map(str, dtypes))} tensor of {numel} "
                         f"elements on {device}, got {t.dtype} {list(t.shape)} on {t.device} "
                         f"(contiguous: {t.is_contiguous()})")  # fmt: skip
    return t.view(-1)


def _check_group(numel: int, group: int, kind: str) -> int:
    if kind not in QMAX:
        raise ValueError(f"quantisation kind must be one of {', '.join(map(repr, QMAX))}, got {kind!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if numel % group:
        raise ValueError(f"numel {numel} is not a multiple of the group size {group}")
    return numel // group


def _pick(backend: str | None, tensor: torch.Tensor, kind: str) -> str:
    """As pick_backend; the default stays on torch for fp8 on GPUs without e4m3 hardware."""
    if backend is None and kind == "fp8" and tensor.is_cuda and not fp8_supported(tensor.device):
        return "torch"
    return pick_backend(backend, tensor)


def quantize_groups(src, group, kind, out_q=None, out_scales=None, backend=None, block_g=None):
    """src: float32/16/bf16, numel a multiple of group (flattened in memory order); kind "int8"
    or "fp8". Returns (q [numel] int8 / float8_e4m3fn, scales [numel // group] float16), written
    into out_q / out_scales when given (contiguous, e.g. slices of a preallocated buffer; the
    Triton backend then allocates nothing). backend: None ("triton" for CUDA tensors when triton
    imports, else "torch"), "torch", "triton". block_g overrides the groups per program."""
    num_groups = _check_group(src.numel(), group, kind)
    if src.dtype not in FLOAT_DTYPES:
        raise ValueError(f"src must be float32, float16 or bfloat16, got {src.dtype}")
    if out_q is None:
        out_q = torch.empty(src.numel(), dtype=QDTYPE[kind], device=src.device)
    if out_scales is None:
        out_scales = torch.empty(num_groups, dtype=torch.float16, device=src.device)
    q = _check_flat(out_q, "out_q", (QDTYPE[kind],), src.numel(), src.device)
    scales = _check_flat(out_scales, "out_scales", (torch.float16,), num_groups, src.device)
    if src.numel() == 0:
        return q, scales
    if _pick(backend, src, kind) == "torch":
        ref_q, ref_scales = quantize_groups_reference(src, group, kind)
        q.copy_(ref_q)
        scales.copy_(ref_scales)
    else:
        quantize_groups_triton(src.contiguous().view(-1), group, kind, q, scales, block_g)
    return q, scales


def dequantize_groups(q, scales, group, out, backend=None, block_g=None) -> torch.Tensor:
    """out (float32/16/bf16, contiguous, q.numel() elements) = q * scale per group, float32
    arithmetic rounded once to out's dtype; written in place and returned (flattened view)."""
    if q.dtype not in QDTYPE.values():
        raise ValueError(f"q must be int8 or float8_e4m3fn, got {q.dtype}")
    num_groups = _check_group(q.numel(), group, "fp8" if q.dtype == torch.float8_e4m3fn else "int8")
    q = _check_flat(q, "q", (q.dtype,), q.numel(), q.device)
    scales = _check_flat(scales, "scales", (torch.float16,), num_groups, q.device)
    flat = _check_flat(out, "out", FLOAT_DTYPES, q.numel(), q.device)
    if q.numel() == 0:
        return flat
    kind = "fp8" if q.dtype == torch.float8_e4m3fn else "int8"
    if _pick(backend, q, kind) == "torch":
        flat.copy_(dequantize_groups_reference(q, scales, group, out.dtype))
    else:
        dequantize_groups_triton(q, scales, group, flat, block_g)
    return flat
