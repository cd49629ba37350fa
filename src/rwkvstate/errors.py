"""Exception types. Every user-facing failure is one of these, with a one-line message."""


class RwkvStateError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class CheckpointError(RwkvStateError, ValueError):
    """A model file is missing, unreadable, not RWKV-7, or has a missing or mis-shaped tensor."""


class StateError(RwkvStateError, ValueError):
    """A state (dict, file or slot) does not fit the pool or model it is meant for."""


class SlotError(RwkvStateError, ValueError):
    """A slot index is out of range, duplicated, or no slot is free."""


class StorageError(RwkvStateError):
    """Reading or writing a file failed for a reason outside the caller's input: a full or
    read-only disk, permissions, an I/O error. Nothing was changed (atomic writes)."""
