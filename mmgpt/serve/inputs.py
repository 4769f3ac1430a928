"""From an HTTP request to validated, decoded inputs: the body-size limit (413), JSON or multipart
bodies validated by one pydantic model (422), and image decoding with a pixel limit (413) that
refuses what is not an image (415)."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import typing
from contextvars import ContextVar
from dataclasses import dataclass, replace

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
        except RecursionError:  # JsonDepthLimit refuses such bodies first; this for an app without it
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON nested too deep"}])
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


class PixelBudget:
    """Pixels being decoded at once, over all requests: a request waits until its pixels fit. Each holds
    its share until its decoding thread is done (not merely until its request gives up waiting)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, pixels: int) -> int:
        pixels = min(pixels, self.capacity)
        while self.used + pixels > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += pixels
        return pixels

    def release(self, pixels: int) -> None:
        self.used -= pixels
        for waiter in self._waiters:  # each checks again whether its pixels fit now
            if not waiter.done():
                waiter.set_result(None)


@dataclass
class ImageLimits:
    """What a server decodes: `max_pixels` per image and `max_request_pixels` per request (both from the
    image headers, before decoding), `budget` pixels at once over all requests, and an image much larger
    than the model's input side `side` decoded reduced (JPEG: at a smaller scale; else decoded, then
    reduced by an integer factor), so it never stays in memory at full size."""

    max_pixels: int
    max_request_pixels: int | None = None
    budget: PixelBudget | None = None
    side: int | None = None


_LIMITS: ContextVar[ImageLimits | None] = ContextVar("mmgpt_image_limits", default=None)


class ImageLimitsScope:
    """ASGI middleware: the app's ImageLimits for every request, so that any route's `decode_images`
    (one added later too, passing only its max_pixels) decodes within the request and in-flight budgets."""

    def __init__(self, app: ASGIApp, limits: ImageLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _LIMITS.set(self.limits)
        try:
            await self.app(scope, receive, send)
        finally:
            _LIMITS.reset(token)


def _status(err: ImageLoadError) -> int:
    if err.cause == "not an image":
        return 415
    if err.cause.startswith("image too large"):
        return 413
    return 422


def _header_pixels(blob: bytes) -> int:
    """width x height from the image's header (no decoding); 0 when it does not read (decode says why)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - the decoder reports the bad image with its reason
        return 0


def decode_reduced(blob: bytes, max_pixels: int, side: int | None) -> Image.Image:
    """An RGB image at least 2 x `side` on its shorter side when the original is larger: a JPEG decoded at
    the smallest scale that keeps that (Pillow's draft), anything else decoded and reduced by an integer
    factor (a box filter, as the model's own resize then antialiases). ImageLoadError as load_image."""
    if not side:
        return load_image(blob, max_pixels=max_pixels)
    try:
        im = Image.open(io.BytesIO(blob))
    except Exception:  # noqa: BLE001 - load_image names the reason (not an image, too large, ...)
        return load_image(blob, max_pixels=max_pixels)
    with im:
        if im.width * im.height > max_pixels:
            return load_image(blob, max_pixels=max_pixels)  # refused by its size, before decoding
        target = 2 * side
        if im.format == "JPEG" and min(im.size) >= 2 * target:
            im.draft(im.mode, (target, target))  # sizes stay >= target
        rgb = load_image(im, max_pixels=max_pixels)
    factor = min(rgb.size) // target
    return rgb.reduce(factor) if factor >= 2 else rgb


def _decode(blobs: list[bytes], names: list[str], max_pixels: int, side: int | None) -> list[Image.Image]:
    images = []
    for blob, name in zip(blobs, names):  # one at a time: at most one full-size image in memory
        try:
            images.append(decode_reduced(blob, max_pixels, side))
        except ImageLoadError as err:
            raise HTTPException(_status(err), f"{name}: {err.cause}") from None
    return images


async def decode_images(blobs: list[bytes], field: str, limits: ImageLimits | int) -> list[Image.Image]:
    """Bytes -> RGB images, off the event loop, within the request's and the server's pixel budgets (413
    past the request's); errors name the field and index (`images[2]: ...`). `limits`: an ImageLimits, or
    just the largest pixel count of one image (the app's budgets, from ImageLimitsScope, then apply)."""
    if isinstance(limits, int):
        app_limits = _LIMITS.get()
        limits = replace(app_limits, max_pixels=limits) if app_limits else ImageLimits(max_pixels=limits)
    names = [f"{field}[{i}]" for i in range(len(blobs))]
    pixels = sum(_header_pixels(b) for b in blobs) if limits.max_request_pixels or limits.budget else 0
    if limits.max_request_pixels and pixels > limits.max_request_pixels:
        raise HTTPException(413, f"{field}: {len(blobs)} images of {pixels} pixels in all; one request may have "
                                 f"at most {limits.max_request_pixels} pixels decoded (send fewer or smaller images)")
    work = functools.partial(_decode, blobs, names, limits.max_pixels, limits.side)
    if limits.budget is None or not pixels:
        return await asyncio.to_thread(work)
    held = await limits.budget.acquire(pixels)
    done = asyncio.get_running_loop().run_in_executor(None, work)

    def finished(future: asyncio.Future) -> None:  # when the thread ends, even if the request left before
        limits.budget.release(held)
        if not future.cancelled():
            future.exception()  # retrieved: a request that left must not log "never retrieved"

    done.add_done_callback(finished)
    return await asyncio.shield(done)
