"""Every error the server answers, as OpenAI-shaped JSON: `{"error": {"message", "type",
"param", "code"}}` with a fitting status.

Client mistakes are 4xx; failures of the server's own resources are 5xx: a state directory
that cannot be written (full, read-only) is 503 `storage_unavailable`, anything unexpected is
500 `internal_error` with the details in the server log only. Messages never show host paths:
the state directory is cut out of every message (clients name files relative to it), and
operating-system errors are reported by their reason alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import describe
from .protocol import APIError

log = logging.getLogger("rwkvstate.server")
MAX_ECHOED_PATH = 200  # characters of a request path quoted back in a 404 or 405


def api_error(e: BaseException, roots: tuple[Path, ...] = ()) -> APIError:
    """The HTTP error for an exception raised here or reported by the engine core; `roots`:
    directories whose paths are cut out of the message."""
    if isinstance(e, APIError):
        return e
    status, message, code, param = describe(e, roots)
    return APIError(status, message, code=code, param=param)


def error_response(error: APIError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def add_error_handlers(app: FastAPI, roots: tuple[Path, ...] = ()) -> None:
    @app.exception_handler(APIError)
    async def api_error_handler(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error_response(validation_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        path = path if len(path) <= MAX_ECHOED_PATH else path[:MAX_ECHOED_PATH] + "..."
        message = f"{exc.detail}: {request.method} {path}"
        return error_response(APIError(exc.status_code, message, code=_slug(str(exc.detail))))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return error_response(api_error(exc, roots))


def validation_api_error(errors) -> APIError:
    """The first pydantic error as a 400 naming the offending parameter."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "a JSON request body is required", code="missing_body")
    param = ".".join(loc)[:MAX_ECHOED_PATH] or None
    message = f"{param}: {first.get('msg')}" if param else f"request body: {first.get('msg')}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, message + more, param=param, code="invalid_value")


def _slug(text: str) -> str:
    return "_".join(text.lower().split())
