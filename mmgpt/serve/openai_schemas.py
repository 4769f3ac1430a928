"""The OpenAI-compatible API's request bodies (OpenAI's schema, the fields mmgpt reads), its error shape,
and what turns a request into generate() options and a cut answer. No FastAPI here: mmgpt.serve.openai_api
serves them."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from mmgpt.serve import schemas

MAX_CHAT_TOKENS = 512  # longest answer a request gets; more is cut to it (finish_reason "length")
MAX_MESSAGES = 64
MAX_CHARS = 20_000  # per text part
MAX_STOPS = 4  # as OpenAI's API

Int = Annotated[int, BeforeValidator(schemas._not_bool)]  # JSON true is not a number here
Positive = Annotated[Int, Field(ge=1)]


class OpenAIError(Exception):
    """An error answered as OpenAI's API answers it."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


ERRORS = {
    400: "a field, an image (not an image, a URL, a path) or a conversation the model cannot take; `param` "
         "names it. Also (`{detail}`) a Host header this server does not answer to",
    401: "no API key, or another one than the server's (`mmgpt serve --api-key`)",
    404: "another model than the one served",
    413: "the body, an image or the request's images in all are over the limits (GET /health: config)",
    504: "no answer within the request time limit",
}


def error_responses(*codes: int) -> dict:
    """The OpenAPI `responses` of the errors an OpenAI route answers with (403 and 422 in the server's own
    `{detail}` shape: another origin, JSON nested too deep)."""
    out: dict = {code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes}
    for code in {413, 404} & set(out):  # the body limit and the router (a path it cannot match) answer too,
        out[code] = {"description": ERRORS[code]}  # before any route, in the server's own `{detail}` shape
    out[403] = {"model": schemas.ErrorResponse, "description": "a request from another origin (--allow-origin)"}
    out[422] = {"model": schemas.ErrorResponse, "description": "JSON nested deeper than the server reads"}
    return out


# --- request bodies ----------------------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Part):
    url: str
    detail: str | None = None  # one size serves every image here


class TextPart(_Part):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CHARS)


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


def _role(value: Any) -> Any:
    if value in ("tool", "function"):
        raise ValueError(f"role {value!r}: this model has no tools; use system, user or assistant")
    return value


class Message(_Part):  # other keys an echoed assistant message carries (refusal, annotations) are ignored
    role: Annotated[Literal["system", "developer", "user", "assistant"], BeforeValidator(_role)]
    content: Annotated[str, Field(max_length=MAX_CHARS)] | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Part):
    include_usage: StrictBool = False


def _one(value: Any) -> Any:
    if value != 1:
        raise ValueError(f"n={value!r}: this server gives one answer per request (n=1); send n requests")
    return value


def _stops(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields are 400, as OpenAI answers them."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = None
    max_tokens: Positive | None = Field(None, description=f"longest answer (at most {MAX_CHAT_TOKENS}: more is cut)")
    max_completion_tokens: Positive | None = Field(None, description="max_tokens' newer name")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Int | None = Field(None, description="best effort: concurrent streams share torch's generator")
    stop: Annotated[Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)] | None,
                    BeforeValidator(_stops)] = None
    n: Annotated[Int, BeforeValidator(_one)] | None = Field(None, description="1 only: one answer per request")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # accepted for clients that always send them; values that would ask for something are refused
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="0 only")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="0 only")
    logprobs: Literal[False] | None = None
    user: str | None = None
    metadata: dict | None = None
    store: Literal[False] | None = None


def _embedding_input(value: Any) -> Any:
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, (int, list)) for v in items):
        raise ValueError("token arrays are not read here: send the texts")
    return value


class ImageInput(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: texts as OpenAI's schema has them; `{"type": "image_url", ...}` items (an mmgpt
    extension) embed images into the same space."""

    model_config = ConfigDict(extra="forbid")

    input: Annotated[Annotated[str, Field(min_length=1, max_length=MAX_CHARS)]
                     | list[Annotated[str, Field(min_length=1, max_length=MAX_CHARS)] | ImageInput],
                     BeforeValidator(_embedding_input)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Positive | None = Field(None, description="the model's embedding size only")
    user: str | None = None


# --- from a request to generation -------------------------------------------------------------------


def image_blob(url: str, where: str) -> bytes:
    """A `data:image/...;base64,` URL -> its bytes; any other URL or a path is a 400 naming `where`."""
    text = url.strip()
    head = text[:12].lower()
    if head.startswith(("http://", "https://", "ftp://")):
        raise OpenAIError(400, f"{where}: this server does not fetch URLs; send the image inline as a "
                               "data:image/png;base64,... URL", where, "url_not_allowed")
    found = schemas.DATA_URL.match(text)
    if not found:
        raise OpenAIError(400, f"{where}: send the image inline as a data:image/png;base64,... URL (file paths "
                               "and other URLs are never opened)", where, "invalid_image_url")
    try:
        return base64.b64decode("".join(text[found.end():].split()), validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, f"{where}: the data URL is not valid base64", where, "invalid_image") from None


def generation(req: ChatRequest, default_tokens: int) -> dict:
    """OpenAI's sampling fields -> generate() options (greedy unless temperature > 0 or top_p asks to
    sample; the model's own defaults for what the request leaves out)."""
    tokens = req.max_completion_tokens or req.max_tokens or default_tokens
    gen: dict = {"max_new_tokens": min(tokens, MAX_CHAT_TOKENS), "num_beams": 1}
    if req.temperature == 0:
        gen["do_sample"] = False
    elif req.temperature is not None or req.top_p is not None:
        gen["do_sample"] = True
        if req.temperature is not None:
            gen["temperature"] = req.temperature
        if req.top_p is not None:
            gen["top_p"] = req.top_p
    if req.seed is not None:
        gen["seed"] = req.seed
    return gen


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopScanner:
    """Streamed pieces -> what may be sent now: held back while the end could still start a stop string, so
    the joined output equals `cut_at_stop` of the whole answer."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held = list(stops), ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text, self.held = self.held + piece, ""
        cut, found = cut_at_stop(text, self.stops)
        if found:
            return cut, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False
