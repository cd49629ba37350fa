"""State pools: where every sequence's recurrent state lives on the device.

A pool has `num_slots` user slots plus one scratch slot (index `num_slots`) that
padding rows of a batch may point at, so they can never touch a live session.

Two layouts share one interface:
- ContiguousPool: one tensor [slots + 1, L, (N + 2) * C] in the storage dtype
  (fp32, fp16 or bf16), slot-major, so one slot's whole state is one block.
- FragmentedPool: the baseline design, L float32 tensors [slots + 1, (N + 2) * C].

The forward reads a layer through `layer(l)`, which returns views
(att_shift [S, C], wkv [S, H, N, N], ffn_shift [S, C]) over all slots; it reads
rows by slot index and writes them back in place. All arithmetic on the state is
float32 whatever the storage dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import SlotError, StateError
from .convert import validate_canonical
from .layout import StateLayout

STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StatePool:
    """Slot allocator plus state storage. Subclasses decide the memory layout."""

    layout_name = "abstract"

    def __init__(self, layout: StateLayout, num_slots: int, dtype: torch.dtype, device):
        if num_slots < 1:
            raise SlotError(f"a pool needs at least one slot, got {num_slots}")
        if dtype not in STATE_DTYPES:
            raise StateError(f"state storage dtype must be float32, float16 or bfloat16, got {dtype}")
        self.layout = layout
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

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

    def copy(self, src: int, dst: int) -> None:
        """Copies slot src's whole state into slot dst (fork)."""
        pairs = zip(self._slot_blocks(self.check_slot(src)), self._slot_blocks(self.check_slot(dst)))
        for a, b in pairs:
            b.copy_(a)

    def export(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's state in the canonical format: CPU float32 tensors."""
        self.check_slot(slot)
        parts = [self.layer(l) for l in range(self.layout.n_layer)]
        out = {}
        for name, i in (("att_shift", 0), ("wkv", 1), ("ffn_shift", 2)):
            out[name] = torch.stack([p[i][slot] for p in parts]).to("cpu", torch.float32)
        return out

    def load(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Writes a canonical-format state into a slot. Checks everything before writing anything."""
        self.check_slot(slot)
        lay = self.layout
        checked = validate_canonical(state, lay.n_layer, lay.n_embd, lay.head_size)
        limit = torch.finfo(self.dtype).max
        for name, value in checked.items():
            if value.abs().max() > limit:
                raise StateError(f"state '{name}' has values beyond the range of the pool's {self.dtype} storage")
        for l in range(self.layout.n_layer):
            att, wkv, ffn = self.layer(l)
            att[slot].copy_(checked["att_shift"][l])
            wkv[slot].copy_(checked["wkv"][l])
            ffn[slot].copy_(checked["ffn_shift"][l])

    def __repr__(self):
        return (
            f"{type(self).__name__}(slots={self.num_slots}, dtype={self.dtype}, device={self.device}, "
            f"layers={self.layout.n_layer}, n_embd={self.layout.n_embd}, nbytes={self.nbytes})"
        )


class ContiguousPool(StatePool):
    layout_name = "contiguous"

    def __init__(self, layout, num_slots, dtype=torch.float32, device="cpu"):
        super().__init__(layout, num_slots, dtype, device)
        self.data = torch.zeros(num_slots + 1, layout.n_layer, layout.layer_numel, dtype=dtype, device=device)

    def _layer_block(self, index):
        return self.data[:, index]

    def _slot_blocks(self, slot):
        return [self.data[slot]]

    @property
    def nbytes(self):
        return self.data.numel() * self.data.element_size()


class FragmentedPool(StatePool):
    layout_name = "fragmented"

    def __init__(self, layout, num_slots, dtype=torch.float32, device="cpu"):
        if dtype != torch.float32:
            raise StateError(f"the fragmented layout stores float32 only, got {dtype}")
        super().__init__(layout, num_slots, dtype, device)
        self.tensors = [
            torch.zeros(num_slots + 1, layout.layer_numel, dtype=dtype, device=device) for _ in range(layout.n_layer)
        ]

    def _layer_block(self, index):
        return self.tensors[index]

    def _slot_blocks(self, slot):
        return [t[slot] for t in self.tensors]

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors)


def new_pool(layout: StateLayout, num_slots: int, dtype=torch.float32, kind="contiguous", device="cpu") -> StatePool:
    pools = {"contiguous": ContiguousPool, "fragmented": FragmentedPool}
    if kind not in pools:
        raise StateError(f"pool layout must be 'contiguous' or 'fragmented', got {kind!r}")
    return pools[kind](layout, num_slots, dtype, device)
