"""Request models (pydantic) and the OpenAI error shape.

Only the fields the runtime honours are declared; other OpenAI fields are accepted and
ignored (`extra="allow"`), except the few whose silent omission would change the answer
(n > 1, logprobs, echo, best_of, suffix, logit_bias, tools), which are refused with 400.
"""

from __future__ import annotations

from typing import Literal, Union, cast

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "server_error",
}  # fmt: skip


DEFAULT_CODES = {401: "unauthorized", 404: "not_found", 409: "conflict", 413: "request_too_large",
                 429: "rate_limited", 500: "internal_error", 503: "unavailable"}  # fmt: skip


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # fmt: skip
        super().__init__(message)
        # never a null code: clients branch on it; specific codes are given where raised
        code = code or DEFAULT_CODES.get(status, "invalid_request" if status < 500 else "server_error")
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension: 0 = off
    min_p: float | None = Field(None, ge=0, le=1)  # extension: 0 = off
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias in [-100, 100]
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)  # extension: 1 = off
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension: None = the tokenizer's end-of-text
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    session: str | None = None  # extension: continue this session (see docs/server.md)
    state: str | None = None  # extension: start from this state file (base64), "stateless mode"
    return_state: bool = False  # extension: the response carries the state file after the request

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a requested feature this server does not provide."""
        if self.n not in (None, 1):
            return "n", "n must be 1: each request produces one choice"
        if getattr(self, "logprobs", None) not in (None, False, 0):
            return "logprobs", "logprobs are not supported"
        if getattr(self, "tools", None) or getattr(self, "functions", None):
            return "tools", "tools and functions are not supported"
        return None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return stops


class CompletionRequest(GenerationRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()

    def single_prompt(self) -> str | list[int]:
        """The prompt as text or token ids; a list of one prompt is that prompt."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"one prompt per request, got {len(p)}", param="prompt")
            p = p[0]
        return cast(Union[str, list[int]], p)  # pydantic checked the element type


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"only text content parts are supported, got {part.type!r}", param="messages")
            parts.append(part.text)
        return "\n".join(parts)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only the text response format is supported"
        return super().unsupported()


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_file: str | None = None  # relative to the server's state directory


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: int | None = Field(None, ge=0)
    turns: int | None = Field(None, ge=1)


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # relative to the state directory; default snapshots/<session>-<time>.state
