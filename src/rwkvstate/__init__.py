"""rwkvstate: a runtime for RWKV-7 language models built around their recurrent state."""

from .model.rwkv7 import Model
from .state.pool import StatePool

__all__ = ["Model", "StatePool"]
__version__ = "0.1.0"
