"""The RWKV-7 layer stack over a packed batch, reading and writing a state pool in place.

The GEMMs are torch (cuBLAS), except on CUDA for small decode batches, where the GEMV kernel of
ops/gemv.py takes r/k/v and the feed-forward; everything between them is an op of ops/ (token
shift, the time mix's prologue and epilogue, WKV-7), each with one torch reference (the CPU path,
and the oracle of its Triton kernel). It runs on CPU and CUDA in fp32, fp16 or bf16 compute; state
arithmetic is always float32 (ops/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from ..errors import StateError
from ..ops.channel_mix import MAX_SPARSE_ROWS, channel_mix
from ..ops._triton import HAS_TRITON, dependent_launches
from ..ops.gemv import gemv, reserve_counters
from ..ops.lora import lora, lora_down_with_projection, lora_up_triton
from ..ops.time_mix import GROUP_NORM_EPS, time_mix_decode_triton, time_mix_epilogue, time_mix_prologue
from ..ops.token_shift import norm_shift_mix
from ..ops.wkv7 import wkv7
from ..state.layout import StateLayout, parse_dtype
from ..state.pool import Device, StatePool, new_pool
from .checkpoint import fingerprint, load_checkpoint, weights_digest
from .packing import Packed, pack, pack_decode
from .weights import LayerWeights, Weights, build_weights

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..tokenizer import Tokenizer

OUTPUTS = ("last", "all", "none")
GEMV_ROWS = 8  # decode batches up to this size may take the GEMV kernel (backends "gemv", "channel_mix")
FUSED_TIME_MIX = "triton-fused"  # backends["time_mix"]: prologue, WKV-7 and epilogue in one launch for decode
FUSED_LORA = "fused"  # backends["lora"]: the LoRA downs in the launch of the r/k/v projection
# the widest model whose batch-1 decode takes FUSED_LORA by default: on an H200 it gained 4-5% at 1.5B
# in two runs, where the chains on the second stream took longer than r/k/v beside them (0.1B: 18% in
# one run, level in the other), and lost 6% at 7.2B, where they were hidden; at 8 rows it lost at
# every width (decode-lora-fused-h200.md, decode-split-reduce-first-h200.md)
FUSED_LORA_MAX_C = 2048
Tokens = Union[Sequence[int], torch.Tensor]  # one sequence's token ids (a list or a 1-D integer tensor)


class Model:
    """An RWKV-7 model: config, weights on one device, and the packed forward."""

    def __init__(self, config: ModelConfig, weights: Weights, dtype: torch.dtype, device: Device,
                 path: str | Path | None = None, weights_digest: str | None = None):  # fmt: skip
        self.config = config
        self.weights = weights
        self.weights_digest = weights_digest  # checkpoint.weights_digest of the tensors loaded; None: unknown
        self.dtype = dtype
        self.device = torch.device(device)
        self.path = Path(path) if path else None
        self._tokenizer: Tokenizer | None = None
        # op backends: None picks Triton kernels for CUDA tensors and the torch reference
        # otherwise; "torch", "triton" (and "triton-per-mix" for token_shift) force one.
        # time_mix: "torch" is the reference of ops/time_mix.py, "triton" its fused kernels (three
        # launches: prologue, WKV-7, epilogue), "triton-fused" the three in one launch for decode
        # batches (time_mix_decode_triton; other passes as "triton"). None: on CUDA "triton-fused"
        # for decode batches (faster than the three kernels at 1-256 rows on an H200 at 2 warps:
        # docs/benchmarks/decode.md), "triton" for prompts
        # wkv: None takes, on CUDA, the token-by-token kernel for decode and prompts alike
        # (the chunked-parallel kernel is slower on an H200, docs/benchmarks/decode.md).
        # "wkv_prefill" (None = as "wkv") applies to calls that feed more than one token to a
        # sequence: "triton-chunked" forces the chunked kernel, "fla" fla-core's chunk_rwkv7
        # channel_mix: "triton" is the sparse feed-forward (GEMV key, the value projection reading
        # only rows of non-zero activations) for passes of up to 16 rows, larger ones take the
        # reference; "triton-gemv" the dense GEMV kernels; "cublas" the GEMMs with relu^2 in one
        # pass and the residual add in the value GEMM; "torch" the reference. None: on CUDA, for
        # decode batches of at most GEMV_ROWS "triton" where it measured faster
        # (_sparse_ffn_pays), else "triton-gemv"; "cublas" for larger passes
        # lora: "triton" computes the four LoRA chains in two launches (GEMV-shaped kernels up to
        # 16 rows, tiles of token rows beyond), "bmm" in batched GEMMs, for any number (ops/lora.py),
        # "torch" the reference (eight GEMMs, two activations); "fused" computes the downs in the
        # launch of the r/k/v projection (lora_down_with_projection) and the ups in a launch of
        # their own, where r/k/v take the GEMV kernel (other passes as None). None: on CUDA "fused"
        # for one row up to C = FUSED_LORA_MAX_C, else "triton" for decode batches (beyond 16 rows
        # its many-rows kernels: 2-9% faster steps than "bmm" at batch 64, up to 6% at 256 on an
        # H200, decode-rows-default-h200) and lora's own choice for prompts ("bmm" beyond 16 rows,
        # faster there)
        # norm_shift: "triton" does the residual add, layer norm and token shift in one launch for
        # decode (None: on CUDA), "torch" as separate ops (the shift with the token_shift backend)
        # gemv: "triton" computes the time mix's r, k, v projections in one launch and its output
        # projection in another (ops/gemv.py) for decode batches of at most GEMV_ROWS; "bmm" r, k, v
        # in one batched GEMM; "torch" F.linear each (cuBLAS). None: on CUDA the kernel for r, k, v
        # of such batches and a batched GEMM for larger passes, F.linear for the output projection
        # (_projection_backends says why); "triton-all" the kernel for both in every pass (slower
        # than cuBLAS beyond 16 rows, kept for measurement). channel_mix "triton-gemv" runs the
        # feed-forward's two projections through the same kernel (relu^2 and the residual add in
        # their epilogues) for such batches (None: on CUDA, where the sparse one does not pay)
        self.backends: dict[str, str | None] = {
            "token_shift": None, "wkv": None, "time_mix": None, "wkv_prefill": None, "channel_mix": None,
            "lora": None, "norm_shift": None, "gemv": None,
        }  # fmt: skip
        # lora_stream: whether the LoRA chains run on a second CUDA stream while r, k, v are
        # projected on the current one (both read only the token-shift mixes; CUDA graphs capture
        # the fork and join). None: while a CUDA graph is being captured (the decode graphs, where
        # it was measured to pay and the fork and join cost no host time at replay), not in eager
        # passes; True: every pass on CUDA; False: never
        self.lora_stream: bool | None = None
        # dependent_launches: whether the decode kernels are launched as programmatic dependent
        # launches (ops/_triton.py dependent_launches; Hopper and later, a no-op elsewhere): each
        # may launch before the previous kernel has finished and waits for it in its first
        # instruction. "start" / "end": when a kernel lets the next one launch; True: "end";
        # False (the default): off. Off by default: on an H200 it gained 1-22% at 0.1B, but at 1.5B
        # and 7.2B it gained in one run and lost up to 6% in the next (docs/benchmarks/decode.md)
        self.dependent_launches: bool | str | None = False
        # made here, not at first use, which may be inside a CUDA-graph capture
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self._side_stream is not None:  # the split kernels' counts on it, before any capture
            reserve_counters(self.device, self._side_stream)
        # how the WKV state is rounded when stored in fp16/bf16: "nearest" or "stochastic"
        self.state_rounding = "nearest"
        self._round_calls = 0  # a fresh stochastic-rounding seed per layer call

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: Device = "cpu", dtype: torch.dtype | str = torch.float32,
             tokenizer: str | None = None, progress: bool | None = None) -> Model:  # fmt: skip
        """Loads a .pth or .safetensors RWKV-7 checkpoint into `dtype` compute on `device`.

        progress: True/False, or None to show a bar for files over 256 MB on a terminal.
        """
        dtype = parse_dtype(dtype)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise StateError("device 'cuda' was asked for, but this torch build sees no CUDA device")
        tensors, config = load_checkpoint(path, tokenizer)
        return cls.from_tensors(tensors, config, device, dtype, path, progress)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: ModelConfig, device: Device = "cpu",
                     dtype: torch.dtype = torch.float32, path: str | Path | None = None,
                     progress: bool | None = None) -> Model:  # fmt: skip
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        bar = _progress_bar(total, progress, Path(path).name if path else "weights")
        try:
            weights = build_weights(tensors, config, dtype, device, bar)
        finally:
            if bar is not None:
                bar.close()
        return cls(config, weights, dtype, device, path, weights_digest(tensors))

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            from ..tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer(self.config.tokenizer)
        return self._tokenizer

    @property
    def state_layout(self) -> StateLayout:
        c = self.config
        return StateLayout(c.n_layer, c.n_embd, c.head_size)

    @property
    def fingerprint(self) -> str:
        """`<architecture>:<weights>`, stored in state files so a state is never loaded into another
        model: 32 hex digits naming the architecture (config sizes, weight names and shapes,
        checkpoint.fingerprint), then 16 naming the weights (checkpoint.weights_digest, computed
        at load); dtype- and device-independent. Without a known digest, the architecture alone."""
        arch = fingerprint(self.config)
        return arch if self.weights_digest is None else f"{arch}:{self.weights_digest}"

    @property
    def description(self) -> str:
        """One line naming the model's sizes (and file), for error messages and state files."""
        c = self.config
        text = f"{c.n_layer} layers, n_embd {c.n_embd}, head_size {c.head_size}, vocab {c.vocab_size}"
        return f"{text} ({self.path.name})" if self.path else text

    def num_params(self) -> int:
        return self.weights.num_params()

    def new_pool(self, slots: int = 8, state_dtype: torch.dtype | str = torch.float32,
                 layout: str = "contiguous") -> StatePool:  # fmt: skip
        return new_pool(self.state_layout, slots, parse_dtype(state_dtype), layout, self.device)

    # ---- forward ------------------------------------------------------------------------
    @overload
    def forward(self, pool: StatePool, slots: Sequence[int], tokens: Sequence[Tokens],
                output: Literal["last"] = "last") -> Tensor: ...  # fmt: skip
    @overload
    def forward(self, pool: StatePool, slots: Sequence[int], tokens: Sequence[Tokens],
                output: Literal["all"]) -> list[Tensor]: ...  # fmt: skip
    @overload
    def forward(self, pool: StatePool, slots: Sequence[int], tokens: Sequence[Tokens],
                output: str) -> Tensor | list[Tensor] | None: ...  # fmt: skip

    @torch.inference_mode()
    def forward(self, pool: StatePool, slots: Sequence[int], tokens: Sequence[Tokens],
                output: str = "last") -> Tensor | list[Tensor] | None:  # fmt: skip
        """Feeds tokens[i] into pool slot slots[i], all sequences in one packed pass.

        output="last": float32 [len(slots), vocab], logits after each sequence's last token
                       (rows of empty sequences are NaN: they fed nothing);
        output="all":  list of float32 [len_i, vocab]; output="none": None.
        Validates everything before touching the pool.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self._check_pool(pool)
        slots = pool.check_slots(list(slots))
        packed = pack(slots, tokens, self.config.vocab_size, self.device)
        pool.begin_write((s for s, t in zip(slots, tokens) if len(t)), check=False)  # checked above
        x = self._layers(pool, packed)
        return self._output(x, packed, output)

    __call__ = forward

    @torch.inference_mode()
    def decode_step(self, pool: StatePool, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of B sequences, from device tensors slots [B] and tokens [B] (int64);
        returns float32 logits [B, vocab]. No validation and no host synchronisation: this is the
        step DecodeGraphs captures in a CUDA graph. Padding rows must point at pool.scratch_slot."""
        packed = pack_decode(slots, tokens)
        return self._head(self._layers(pool, packed))

    def _check_pool(self, pool: StatePool) -> None:
        if not isinstance(pool, StatePool):
            raise StateError(f"expected a StatePool, got {type(pool).__name__}")
        if pool.layout != self.state_layout:
            raise StateError(f"pool holds states of {pool.layout}, but the model needs {self.state_layout}")
        if pool.device != self.device and not (pool.device.type == self.device.type == "cuda"):
            raise StateError(f"pool is on {pool.device}, model on {self.device}")

    def _layers(self, pool: StatePool, packed: Packed) -> torch.Tensor:
        x = self.weights.emb[packed.tokens]
        if packed.num_tokens == 0:
            return x
        v_first = None
        side = self._lora_side_stream()  # once per pass: whether a graph is being captured holds for all layers
        with dependent_launches(self._launch_trigger()):
            for index, lw in enumerate(self.weights.layers):
                att_shift, wkv_state, ffn_shift = pool.layer(index)
                dx, v_first = self._time_mix(lw, x, packed, att_shift, wkv_state, v_first, side)
                x = self._channel_mix(lw, x, dx, packed, ffn_shift)
        return x

    def _norm_shift(self, x: Tensor, delta: Tensor | None, ln: tuple[Tensor, Tensor], shift_state: Tensor,
                    packed: Packed, mix: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(x + delta, the token-shift mixes of LayerNorm(x + delta)), updating the shift state."""
        b = self.backends
        return norm_shift_mix(x, delta, *ln, shift_state, packed, mix, backend=b["norm_shift"], shift_backend=b["token_shift"])

    def _time_mix(self, lw: LayerWeights, x: Tensor, packed: Packed, att_shift: Tensor, wkv_state: Tensor,
                  v_first: Tensor | None, side: torch.cuda.Stream | None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The time mix of LayerNorm_1(x), without the residual add: returns (its output, v_first).
        side: the second stream of the LoRA chains (_lora_side_stream), or None."""
        _, mixed = self._norm_shift(x, None, lw.ln1, att_shift, packed, lw.mix)
        rkv_backend, out_backend = self._projection_backends(packed)
        # w = tanh(xw W1) W2, a_lora = (xa A1) A2, g = sigmoid(xg G1) G2, v_lora = (xv V1) V2 (layers >= 1);
        # a0 and v0 are added after the LoRAs
        lora_backend = self._lora_backend(packed, rkv_backend)
        if lora_backend == FUSED_LORA:  # the downs in the r/k/v launch, the ups in their own
            rkv, h = lora_down_with_projection(mixed, lw.rkv, lw.lora)
            r, k, v = rkv.unbind(0)
            *v_lora_, w, a_lora, g = lora_up_triton(h, lw.lora)
        elif side is None:
            r, k, v = gemv(mixed[:3], lw.rkv, backend=rkv_backend).unbind(0)  # mixes r, k, v come first
            *v_lora_, w, a_lora, g = lora(mixed, lw.lora, backend=lora_backend)
        else:
            # The chains on the side stream, r/k/v on this one, joined before the prologue. Memory:
            # the mixes are this stream's and stay referenced until after the join; the chains'
            # outputs come from the side stream's pool and, once this stream has read them and
            # dropped them, the side stream reuses them only after its next wait on this stream.
            main = torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                *v_lora_, w, a_lora, g = lora(mixed, lw.lora, backend=lora_backend)
            r, k, v = gemv(mixed[:3], lw.rkv, backend=rkv_backend).unbind(0)
            main.wait_stream(side)
        if lw.v0 is None:
            v_first, v_lora = v, None
        else:
            assert v_first is not None, "layer 0 sets v_first"
            v_lora = v_lora_[0]  # layers >= 1 have the value-residual LoRA
        out = self._time_mix_core(lw, packed, wkv_state, r, w, k, v, a_lora, g, v_lora, v_first)
        return gemv(out, lw.output, backend=out_backend), v_first

    def _lora_backend(self, packed: Packed, rkv_backend: str | None) -> str | None:
        """The lora backend of this pass: backends["lora"], with None made FUSED_LORA where it
        measured faster (one row whose r/k/v take the GEMV kernel, C <= FUSED_LORA_MAX_C) and
        "triton" for other decode batches on CUDA, and the fused path falling back where it does
        not apply."""
        backend = self.backends["lora"]
        fits = rkv_backend == "triton" and self._gemv_pass(packed)
        if backend is None and self._kernels():
            if fits and packed.num_tokens == 1:
                return FUSED_LORA if self.config.n_embd <= FUSED_LORA_MAX_C else None
            if packed.is_decode:
                return "triton"  # beyond 16 rows the many-rows kernels, not lora's own "bmm"
        if backend == FUSED_LORA and not fits:
            return None
        return backend

    def _launch_trigger(self) -> str | None:
        """The trigger of dependent launches for this model's kernels (None: plain launches)."""
        wanted = self.dependent_launches
        if self.device.type != "cuda" or not wanted:
            return None
        return wanted if isinstance(wanted, str) else "end"

    def _lora_side_stream(self) -> torch.cuda.Stream | None:
        """The second stream of the LoRA chains, or None to run them on the current stream."""
        wanted = self.lora_stream
        if wanted is None:
            wanted = self._side_stream is not None and torch.cuda.is_current_stream_capturing()
        return self._side_stream if wanted else None

    def _sparse_ffn_pays(self, packed: Packed, C: int) -> bool:
        """Whether the sparse feed-forward (the value projection reads only the rows of non-zero
        activations) is the default for this pass: where it measured faster than the dense GEMV
        kernel on an H200 with random weights (about half the activations zero; bench_ffn.py,
        docs/benchmarks/ffn-h200.md): one row at C >= 2048 (1.5B: 10.8 against 13.2 us), up to
        GEMV_ROWS rows at C >= 4096 (7.2B); not at C = 768, nor at 1.5B beyond one row, where
        fewer rows can be skipped and the dense kernel is faster."""
        rows = packed.num_tokens
        return self._gemv_pass(packed) and (C >= 4096 or (rows == 1 and C >= 2048))

    def _gemv_pass(self, packed: Packed) -> bool:
        """Whether the GEMV kernel applies to this pass: a decode batch of at most GEMV_ROWS rows."""
        return packed.is_decode and packed.num_tokens <= GEMV_ROWS

    def _kernels(self) -> bool:
        return self.device.type == "cuda" and HAS_TRITON

    def _projection_backends(self, packed: Packed) -> tuple[str | None, str | None]:
        """The gemv backends of the time mix's r/k/v projections (one grouped call) and of its
        output projection. None: on CUDA the kernel for r/k/v of a small decode batch (1.5-1.9x
        cuBLAS on an H200), one batched GEMM for them otherwise, cuBLAS for the output (the kernel
        measured up to 12% slower there); the reference on the CPU. "triton" asks for the kernel
        for both where it applies; "triton-all" the kernel for both in every pass (its token tiles
        beyond 16 rows: 6-17% slower steps than cuBLAS at batch 256 on an H200, bench_decode
        variant 29, decode-rows-default-h200); a bad name passes through to the op's check."""
        backend, small = self.backends["gemv"], self._gemv_pass(packed)
        if backend == "triton-all":
            return "triton", "triton"
        if backend is None or (backend == "triton" and not small):
            if not self._kernels():
                return "torch", "torch"
            return ("triton" if small and backend is None else "bmm"), "torch"
        return backend, backend

    def _time_mix_core(self, lw: LayerWeights, packed: Packed, wkv_state: Tensor, r: Tensor, w: Tensor, k: Tensor,
                       v: Tensor, a_lora: Tensor, g: Tensor, v_lora: Tensor | None, v_first: Tensor) -> Tensor:  # fmt: skip
        """Everything between the GEMMs: the prologue, WKV-7, the epilogue (ops/time_mix.py; its
        torch reference on the CPU, one fused kernel each on CUDA unless backends say otherwise)."""
        H, N = self.config.n_head, self.config.head_size
        backend = self.backends["time_mix"]
        if backend is None and self._kernels() and packed.is_decode:
            backend = FUSED_TIME_MIX
        v_mix = None if v_lora is None else v_first  # layer 0 takes v as it is
        if backend == FUSED_TIME_MIX:  # one launch for decode batches; the three kernels otherwise
            if packed.is_decode:
                rounding, seed = self._state_rounding()
                return time_mix_decode_triton(
                    wkv_state, packed, r, w, k, v, a_lora, g, v_lora, v_mix, lw.w0, lw.a0, lw.v0, lw.k_k, lw.k_a,
                    lw.r_k, *lw.ln_x, H, N, eps=GROUP_NORM_EPS, rounding=rounding, seed=seed,
                )  # fmt: skip
            backend = "triton"
        decay, k, v, a_in, b_in = time_mix_prologue(
            k, v, w, a_lora, v_lora, v_mix, lw.w0, lw.a0, lw.v0, lw.k_k, lw.k_a, H, N, backend=backend
        )
        y = self._wkv(wkv_state, packed, r, decay, k, v, a_in, b_in)
        return time_mix_epilogue(y, r, k, v, g, lw.r_k, *lw.ln_x, H, N, eps=GROUP_NORM_EPS, backend=backend)

    def _state_rounding(self) -> tuple[str, int]:
        """How a layer call stores the WKV state: the rounding and a fresh stochastic-rounding seed."""
        self._round_calls += 1
        return self.state_rounding, self._round_calls

    def _wkv(self, wkv_state: Tensor, packed: Packed, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor,
             b: Tensor) -> Tensor:  # fmt: skip
        """WKV-7 on [T, C] inputs viewed as [T, H, N]; returns y [T, C] float32."""
        T, C = r.shape
        H, N = self.config.n_head, self.config.head_size
        r, w, k, v, a, b = (t.view(T, H, N) for t in (r, w, k, v, a, b))
        backend = self.backends["wkv"]
        if not packed.is_decode and self.backends["wkv_prefill"] is not None:
            backend = self.backends["wkv_prefill"]
        rounding, seed = self._state_rounding()
        y = wkv7(wkv_state, packed, r, w, k, v, a, b, backend=backend, rounding=rounding, seed=seed)
        return y.view(T, C)

    def _channel_mix(self, lw: LayerWeights, x: Tensor, dx: Tensor, packed: Packed, ffn_shift: Tensor) -> Tensor:
        """x + dx (the time mix's residual add) plus the channel mix of LayerNorm_2(x + dx)."""
        x, mixed = self._norm_shift(x, dx, lw.ln2, ffn_shift, packed, lw.ffn_x_k.unsqueeze(0))
        backend = self.backends["channel_mix"]
        if backend is None and self._kernels():
            if self._gemv_pass(packed):  # the GEMV kernels, with relu^2 and the residual add fused
                backend = "triton" if self._sparse_ffn_pays(packed, x.shape[1]) else "triton-gemv"
            else:  # cuBLAS GEMMs, relu^2 in one pass, the residual add in the value GEMM
                backend = "cublas"
        if (backend == "triton-gemv" and not self._gemv_pass(packed)) or (
            backend == "triton" and mixed[0].shape[0] > MAX_SPARSE_ROWS  # the sparse kernel is for decode
        ):
            backend = "torch"
        # x is this pass's own residual: the cuBLAS value GEMM may add into it
        return channel_mix(mixed[0], lw.ffn_key, lw.ffn_value, x, backend=backend, in_place=True)

    def _output(self, x: Tensor, packed: Packed, output: str) -> Tensor | list[Tensor] | None:
        if output == "none":
            return None
        V = self.config.vocab_size
        if output == "all":
            logits = self._head(x)
            return list(logits.split(packed.lengths))
        out = torch.full((len(packed.lengths), V), float("nan"), dtype=torch.float32, device=self.device)
        if packed.live:
            rows = torch.tensor(packed.live, device=self.device)
            out[rows] = self._head(x[packed.last_rows])
        return out

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (x.shape[-1],), *self.weights.ln_out)
        return F.linear(x, self.weights.head).float()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model(n_layer={c.n_layer}, n_embd={c.n_embd}, head_size={c.head_size}, vocab={c.vocab_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _progress_bar(total_bytes: int, progress: bool | None, name: str) -> tqdm | None:
    if progress is None:
        progress = total_bytes > 256 * 2**20 and os.isatty(2)
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {name}", leave=False)
