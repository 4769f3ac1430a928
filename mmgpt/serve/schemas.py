"""Request and response bodies of the HTTP API, with every limit a client can hit.

Images arrive as bytes: multipart file uploads, or base64 strings (a `data:` URL prefix is allowed)
in JSON. Nothing a client sends is ever opened as a file: a string that is not base64 is refused,
and a field named like a path, file or URL is refused by name.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

MAX_NEW_TOKENS = 64
MAX_BEAMS = 5
MAX_IMAGES = 16  # per request
MAX_TEXTS = 64  # per request
MAX_TEXT_CHARS = 1000

DATA_URL = re.compile(r"data:[\w/+.-]*;base64,", re.IGNORECASE)
PATH_LIKE_FIELD = re.compile(r"path|file|dir|url|uri", re.IGNORECASE)


def _image_bytes(value: Any) -> Any:
    """bytes (a multipart upload) pass; a str must be base64 image data, never a path or URL."""
    if isinstance(value, str):
        text = DATA_URL.sub("", value.strip(), count=1)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "not base64 image data (send the image's bytes, base64-encoded, or upload it as a file; "
                "file-system paths and URLs are not accepted)"
            ) from None
    return value


ImageData = Annotated[
    bytes,
    BeforeValidator(_image_bytes),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "description": "base64-encoded image file"}),
]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


def _not_bool(value: Any) -> Any:
    """JSON `true` is not a count (pydantic would read it as 1); numbers and form strings pass on."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")  # noqa: TRY004 - pydantic reports ValueError
    return value


def Count(low: int, high: int) -> Any:  # a type, named as one
    """An integer in [low, high], written into the schema as `minimum` / `maximum`: the bounds come before
    the validator (after it, or on the field of an `X | None`, pydantic writes `ge` / `le`, which no client
    reads)."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_not_bool)]


class Body(BaseModel):
    """Unknown fields are errors; fields named like paths or URLs get a message saying why."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if isinstance(name, str) and name not in cls.model_fields and PATH_LIKE_FIELD.search(name):
                    raise ValueError(f"field {name!r}: clients send image data, never file-system paths or URLs")
        return data


class Generation(Body):
    """Generation options, bounded so one request cannot hold the model for long."""

    # None: the model's saved generation_config, else 32 tokens and greedy (as `mmgpt.load(...)` does)
    max_new_tokens: Count(1, MAX_NEW_TOKENS) | None = Field(None, description="longest output, in tokens (default: the model's, else 32)")
    num_beams: Count(1, MAX_BEAMS) | None = Field(None, description="beam search width (1: greedy; default: the model's, else 1)")

    def options(self) -> tuple[tuple[str, int], ...]:
        """Hashable: requests with equal options can share a batch. Only the options the request set."""
        return tuple((k, v) for k, v in (("max_new_tokens", self.max_new_tokens), ("num_beams", self.num_beams))
                     if v is not None)


class CaptionRequest(Generation):
    images: list[ImageData] = Field(min_length=1, max_length=MAX_IMAGES)


class AskRequest(Generation):
    images: list[ImageData] = Field(min_length=1, max_length=MAX_IMAGES)
    question: Text = Field(description="asked of every image")


class AskStreamRequest(Generation):
    image: ImageData
    question: Text
    num_beams: Count(1, 1) | None = Field(None, description="streaming is greedy: beam search settles tokens only at the end")


class EmbedRequest(Body):
    images: list[ImageData] = Field(default_factory=list, max_length=MAX_IMAGES)
    texts: list[Text] = Field(default_factory=list, max_length=MAX_TEXTS)

    @model_validator(mode="after")
    def _something(self) -> EmbedRequest:
        if not self.images and not self.texts:
            raise ValueError("give images, texts or both")
        return self


class SimilarityRequest(Body):
    images: list[ImageData] = Field(min_length=1, max_length=MAX_IMAGES)
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)


class CaptionResponse(BaseModel):
    captions: list[str]


class AskResponse(BaseModel):
    answers: list[str]


class EmbedResponse(BaseModel):
    image_embeddings: list[list[float]] = Field(description="(N_images, E), L2-normed")
    text_embeddings: list[list[float]] = Field(description="(N_texts, E), L2-normed")


class SimilarityResponse(BaseModel):
    similarity: list[list[float]] = Field(description="(N_images, N_texts) cosine similarities")


class ErrorResponse(BaseModel):
    """Every error: `detail` is a message, or for 422 a list of {loc, msg, type} (pydantic's errors)."""

    detail: str | list[dict[str, Any]]


ERRORS = {
    400: "the Host header is not one this server answers to",
    403: "a request from another origin (a web page elsewhere) that --allow-origin does not allow",
    413: "the body, an image, or the request's images in all are over the limits (GET /health: config)",
    415: "an image that is not an image, or a body that is neither JSON nor multipart/form-data",
    422: "invalid JSON (or nested too deep), a field out of its range, or input the model cannot take "
         "(e.g. a question longer than its decoder reads)",
    504: "no answer within the request time limit",
}


def error_responses(*codes: int) -> dict:
    """The OpenAPI `responses` of the errors a route can answer with."""
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes or ERRORS}
