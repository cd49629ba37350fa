"""rwkvstate: a runtime for RWKV-7 language models built around their recurrent state."""

from .model.rwkv7 import Model
from .runtime.engine import Engine
from .runtime.sampling import SamplingParams
from .runtime.session import GenerationStream, Session, SessionSnapshot
from .state.pool import StatePool
from .version import __version__

__all__ = ["Model", "StatePool", "Engine", "Session", "SessionSnapshot", "GenerationStream", "SamplingParams"]
