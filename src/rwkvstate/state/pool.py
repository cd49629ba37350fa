"""State pools: where every sequence's recurrent state lives on the device.

A pool has `num_slots` user slots plus one scratch slot (index `num_slots`) that
padding rows of a batch may point at, so they can never touch a live session.

Two layouts share one interface (every method works on both):
- ContiguousPool: one tensor [slots + 1, L, (N + 2) * C] in the storage dtype
  (fp32, fp16 or bf16), slot-major, so one slot's whole state is one block.
- FragmentedPool: the seed's baseline design, L float32 tensors [slots + 1, (N + 2) * C];
  a slot is L blocks, so a snapshot of it gathers them (one copy more than contiguous).

The forward reads a layer through `layer(l)`, which returns views
(att_shift [S, C], wkv [S, H, N, N], ffn_shift [S, C]) over all slots; it reads
rows by slot index and writes them back in place. All arithmetic on the state is
float32 whatever the storage dtype.

The pool is the single source of truth for every state. Each slot carries a write
generation that the pool bumps itself: in its own writers (reset, copy, load*), and in
`begin_write`, through which a forward (eager or a replayed graph) gets the slots it writes;
host copies (`host_copy`) are made lazily, in one contiguous copy into pinned memory,
and reused while the slot's generation has not moved. `bytes_to_host` and
`bytes_to_device` count every byte moved across the bus.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch

from ..errors import SlotError, StateError
from .convert import validate_canonical
from .layout import CANONICAL_KEYS, STORAGE_DTYPES, StateLayout
from .snapshot import Encoded, decode, default_group, encode

Device = Union[torch.device, str]  # what torch accepts as a device


class StatePool:
    """Slot allocator plus state storage. Subclasses decide the memory layout."""

    layout_name = "abstract"

    def __init__(self, layout: StateLayout, num_slots: int, dtype: torch.dtype, device: Device):
        if num_slots < 1:
            raise SlotError(f"a pool needs at least one slot, got {num_slots}")
        if dtype not in STORAGE_DTYPES.values():
            raise StateError(f"state storage dtype must be float32, float16 or bfloat16, got {dtype}")
        self.layout = layout
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.generation = [0] * (num_slots + 1)  # per slot, bumped by every write
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self._host: dict[int, tuple[int, torch.Tensor]] = {}  # slot -> (generation, host copy)

    # ---- allocator (like a block manager) -------------------------------------------------
    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def can_allocate(self, count: int = 1) -> bool:
        return len(self._free) >= count

    def allocate(self) -> int:
        """Hands out a free slot, reset to the zero state."""
        if not self._free:
            raise SlotError(f"all {self.num_slots} slots of the pool are in use")
        slot = self._free.pop()
        self.reset(slot)
        return slot

    def free(self, slot: int) -> None:
        self.check_slot(slot)
        if slot in self._free:
            raise SlotError(f"slot {slot} is already free")
        self._free.append(slot)

    def check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise SlotError(f"slot {slot!r} is out of range for a pool of {self.num_slots} slots")
        return slot

    def check_slots(self, slots: Sequence[int]) -> list[int]:
        slots = [self.check_slot(int(s) if torch.is_tensor(s) else s) for s in slots]
        if len(set(slots)) != len(slots):
            raise SlotError(f"slots must be distinct within one forward, got {slots}")
        return slots

    # ---- write generations and host copies ----------------------------------------------
    def begin_write(self, slots: Iterable[int], check: bool = True) -> list[int]:
        """Checks the slots a forward is about to write (distinct, in range; check=False: the
        caller has) and bumps their write generations. Bumping before the write is safe: a forward
        that fails midway has written part of its slots, and their host copies must not be reused."""
        checked = self.check_slots(list(slots)) if check else list(slots)
        self._bump(checked)
        return checked

    def _bump(self, slots: Iterable[int]) -> None:
        for slot in slots:
            self.generation[slot] += 1

    def new_host_buffer(self) -> torch.Tensor:
        """An empty host buffer for one slot [L, (N + 2) * C] in the storage dtype; pinned
        when the pool is on a GPU, so copies into it are asynchronous DMA transfers."""
        lay = self.layout
        pin = self.device.type == "cuda"
        return torch.empty(lay.n_layer, lay.layer_numel, dtype=self.dtype, pin_memory=pin)

    def host_copy(self, slot: int) -> torch.Tensor:
        """The slot's state on the host [L, (N + 2) * C] in the storage dtype (read-only by
        contract). Copied only if the slot was written since the last host copy."""
        self.check_slot(slot)
        cached = self._host.get(slot)
        if cached is not None and cached[0] == self.generation[slot]:
            return cached[1]
        buffer = cached[1] if cached is not None else self.new_host_buffer()
        self._copy_out(slot, buffer)
        self._host[slot] = (self.generation[slot], buffer)
        return buffer

    def take_host_copy(self, slot: int) -> torch.Tensor:
        """Hands the slot's current host copy over to the caller (who may keep it after the
        slot is reused), copying first only if it is stale."""
        buffer = self.host_copy(slot)
        del self._host[slot]
        return buffer

    def load_host(self, slot: int, buffer: torch.Tensor, keep: bool = True) -> None:
        """Writes a host buffer [L, (N + 2) * C] in the storage dtype into the slot. With keep,
        the buffer becomes the slot's host copy (it equals the slot), so an unchanged slot
        is never copied back."""
        self.check_slot(slot)
        lay = self.layout
        if tuple(buffer.shape) != (lay.n_layer, lay.layer_numel) or buffer.dtype != self.dtype:
            raise StateError(
                f"host state has shape {list(buffer.shape)} {buffer.dtype}, expected "
                f"[{lay.n_layer}, {lay.layer_numel}] {self.dtype}"
            )
        for block, part in self._host_pairs(slot, buffer):
            block.copy_(part, non_blocking=buffer.is_pinned())
        self.bytes_to_device += buffer.numel() * buffer.element_size()
        self._bump([slot])
        if keep:
            self._host[slot] = (self.generation[slot], buffer)

    def _copy_out(self, slot: int, buffer: torch.Tensor) -> None:
        for block, part in self._host_pairs(slot, buffer):
            part.copy_(block, non_blocking=buffer.is_pinned())
        if buffer.is_pinned():
            torch.cuda.current_stream(self.device).synchronize()
        self.bytes_to_host += buffer.numel() * buffer.element_size()

    def _host_pairs(self, slot: int, buffer: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device block, host part) copy units: one [L, (N+2)C] pair when contiguous, L when not."""
        blocks = self._slot_blocks(slot)
        return [(blocks[0], buffer)] if len(blocks) == 1 else list(zip(blocks, buffer))

    # ---- storage --------------------------------------------------------------------------
    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (att_shift [S+1, C], wkv [S+1, H, N, N], ffn_shift [S+1, C]) of one layer."""
        return self.layout.split_layer(self._layer_block(index))

    def _layer_block(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _slot_blocks(self, slot: int) -> list[torch.Tensor]:
        """The memory of one slot as few blocks as the layout allows (1 contiguous, L fragmented)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of state storage, scratch slot included."""
        raise NotImplementedError

    @property
    def slot_nbytes(self) -> int:
        return self.layout.slot_nbytes(self.dtype)

    def reset(self, slot: int) -> None:
        for block in self._slot_blocks(self.check_slot(slot)):
            block.zero_()
        self._bump([slot])

    def copy(self, src: int, dst: int) -> None:
        """Copies slot src's whole state into slot dst (fork)."""
        pairs = zip(self._slot_blocks(self.check_slot(src)), self._slot_blocks(self.check_slot(dst)))
        for a, b in pairs:
            b.copy_(a)
        self._bump([dst])

    def slot_view(self, slot: int) -> torch.Tensor:
        """The slot's whole state as one flat tensor [L * (N + 2) * C] in the storage dtype: a view
        of the pool when the layout keeps a slot in one block (contiguous: writes reach the
        slot), else a gathered copy (fragmented)."""
        blocks = self._slot_blocks(self.check_slot(slot))
        return blocks[0].view(-1) if len(blocks) == 1 else torch.cat([b.reshape(-1) for b in blocks])

    def encode_slot(self, slot: int, fmt: str, out: Encoded | None = None) -> Encoded:
        """A snapshot of the slot in any format (into out's buffers when given), grouped by rows
        of head_size elements (`default_group`)."""
        return encode(self.slot_view(slot), fmt, default_group(self.layout), out=out)

    def load_encoded(self, slot: int, enc: Encoded) -> None:
        """Writes an encoded snapshot (any format, on the host or this device) into the slot."""
        blocks = self._slot_blocks(self.check_slot(slot))
        if enc.device != self.device:
            enc = enc.to(self.device)
            self.bytes_to_device += enc.nbytes
        if len(blocks) == 1:
            decode(enc, blocks[0].view(-1))
        else:  # decode whole, then scatter the layers to their blocks
            flat = torch.empty(self.layout.slot_numel, dtype=self.dtype, device=self.device)
            decode(enc, flat)
            for block, part in zip(blocks, flat.view(len(blocks), -1)):
                block.copy_(part)
        self._bump([slot])

    def export(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's state in the canonical format: new CPU float32 tensors (from the lazy
        host copy, so exporting an unchanged slot moves no bytes)."""
        att, wkv, ffn = self.layout.split_layer(self.host_copy(slot))
        return {name: part.to(torch.float32, copy=True).contiguous() for name, part in zip(CANONICAL_KEYS, (att, wkv, ffn))}

    def load(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Writes a canonical-format state into a slot. Checks everything before writing anything."""
        self.check_slot(slot)
        lay = self.layout
        checked = validate_canonical(state, lay.n_layer, lay.n_embd, lay.head_size)
        self.check_fits(checked)
        for l in range(self.layout.n_layer):
            att, wkv, ffn = self.layer(l)
            att[slot].copy_(checked["att_shift"][l])
            wkv[slot].copy_(checked["wkv"][l])
            ffn[slot].copy_(checked["ffn_shift"][l])
        self.bytes_to_device += self.slot_nbytes
        self._bump([slot])

    def check_fits(self, state: dict[str, torch.Tensor]) -> None:
        """A StateError if a (validated) canonical state holds values the storage dtype cannot."""
        limit = torch.finfo(self.dtype).max
        for name, value in state.items():
            if value.abs().max() > limit:
                raise StateError(f"state '{name}' has values beyond the range of the pool's {self.dtype} storage")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(slots={self.num_slots}, dtype={self.dtype}, device={self.device}, "
            f"layers={self.layout.n_layer}, n_embd={self.layout.n_embd}, nbytes={self.nbytes})"
        )


class ContiguousPool(StatePool):
    layout_name = "contiguous"

    def __init__(self, layout: StateLayout, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: Device = "cpu"):  # fmt: skip
        super().__init__(layout, num_slots, dtype, device)
        self.data = torch.zeros(num_slots + 1, layout.n_layer, layout.layer_numel, dtype=dtype, device=device)

    def _layer_block(self, index: int) -> torch.Tensor:
        return self.data[:, index]

    def _slot_blocks(self, slot: int) -> list[torch.Tensor]:
        return [self.data[slot]]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class FragmentedPool(StatePool):
    layout_name = "fragmented"

    def __init__(self, layout: StateLayout, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: Device = "cpu"):  # fmt: skip
        if dtype != torch.float32:
            raise StateError(f"the fragmented layout stores float32 only, got {dtype}")
        super().__init__(layout, num_slots, dtype, device)
        self.tensors = [
            torch.zeros(num_slots + 1, layout.layer_numel, dtype=dtype, device=device) for _ in range(layout.n_layer)
        ]

    def _layer_block(self, index: int) -> torch.Tensor:
        return self.tensors[index]

    def _slot_blocks(self, slot: int) -> list[torch.Tensor]:
        return [t[slot] for t in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def new_pool(layout: StateLayout, num_slots: int, dtype: torch.dtype = torch.float32, kind: str = "contiguous",
             device: Device = "cpu") -> StatePool:  # fmt: skip
    pools = {"contiguous": ContiguousPool, "fragmented": FragmentedPool}
    if kind not in pools:
        raise StateError(f"pool layout must be 'contiguous' or 'fragmented', got {kind!r}")
    return pools[kind](layout, num_slots, dtype, device)
