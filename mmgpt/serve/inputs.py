"""From an HTTP request to validated, decoded inputs: the body-size limit (413), JSON or multipart
bodies validated by one pydantic model (422), and image decoding with a pixel limit (413) that
refuses what is not an image (415)."""

from __future__ import annotations

import asyncio
import json
import typing

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from encoders import ImageLoadError, load_image
from mmgpt.serve.schemas import MAX_IMAGES, MAX_TEXTS

M = typing.TypeVar("M", bound=BaseModel)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: a declared Content-Length over the limit is refused before reading; a body
    without one (chunked) is counted as it arrives and refused once it passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # the route's exception handler answers 413
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:  # raised where no handler caught it (outside a route)
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": BodyTooLarge(self.max_bytes).detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# --- bodies ----------------------------------------------------------------------------------------


def _list_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, f in model.model_fields.items() if typing.get_origin(f.annotation) is list}


def _image_fields(model: type[BaseModel]) -> set[str]:
    return {name for name in model.model_fields if name.startswith("image")}


async def _form_data(request: Request, model: type[BaseModel], max_bytes: int) -> dict:
    """Multipart fields -> the dict the JSON body would have been; image fields must be uploads."""
    lists, images = _list_fields(model), _image_fields(model)
    form = await request.form(max_files=MAX_IMAGES + 1, max_fields=MAX_TEXTS + 16, max_part_size=max_bytes)
    data: dict = {}
    for name in form:
        values = []
        for value in form.getlist(name):
            if name in images:
                if not isinstance(value, UploadFile):
                    raise RequestValidationError([{
                        "type": "value_error", "loc": ("body", name),
                        "msg": f"{name} must be file uploads; file-system paths and URLs are not accepted",
                    }])
                value = await value.read()
            elif isinstance(value, UploadFile):
                raise RequestValidationError([{
                    "type": "value_error", "loc": ("body", name), "msg": f"{name} must be a text field, not a file",
                }])
            values.append(value)
        data[name] = values if name in lists else values[-1]
    return data


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    """A JSON or multipart/form-data body validated by `model`; 422 with pydantic's errors."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        data = await _form_data(request, model, max_bytes)
    elif kind in ("application/json", ""):
        try:
            data = json.loads(await request.body() or b"null")
        except ValueError as err:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"invalid JSON: {err}"}])
        if not isinstance(data, dict):
            raise RequestValidationError([{"type": "dict_type", "loc": ("body",), "msg": "the body must be a JSON object"}])
    else:
        raise HTTPException(415, f"send application/json or multipart/form-data, not {kind}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # inputs left out: they may be image bytes, which JSON cannot carry back
        errors = err.errors(include_input=False, include_url=False, include_context=False)
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"]), "msg": e["msg"].removeprefix("Value error, ")} for e in errors]
        ) from None


# --- images ----------------------------------------------------------------------------------------


def _status(err: ImageLoadError) -> int:
    if err.cause == "not an image":
        return 415
    if err.cause.startswith("image too large"):
        return 413
    return 422


def _decode(blobs: list[bytes], names: list[str], max_pixels: int) -> list[Image.Image]:
    images = []
    for blob, name in zip(blobs, names):
        try:
            images.append(load_image(blob, max_pixels=max_pixels))
        except ImageLoadError as err:
            raise HTTPException(_status(err), f"{name}: {err.cause}") from None
    return images


async def decode_images(blobs: list[bytes], field: str, max_pixels: int) -> list[Image.Image]:
    """Bytes -> RGB images, off the event loop; errors name the field and index (`images[2]: ...`)."""
    names = [f"{field}[{i}]" for i in range(len(blobs))]
    return await asyncio.to_thread(_decode, blobs, names, max_pixels)
