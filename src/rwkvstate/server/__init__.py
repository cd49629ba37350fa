"""An OpenAI-compatible HTTP server with continuous batching and persistent sessions.

Needs the `server` extra (fastapi, uvicorn, pyzmq, msgspec). docs/server.md describes the API.
"""

from ..runtime.core import ModelSpec
from .app import create_app
from .background import BackgroundServer, serve
from .config import ServerConfig

__all__ = ["create_app", "serve", "BackgroundServer", "ServerConfig", "ModelSpec"]
