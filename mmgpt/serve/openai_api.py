"""An OpenAI-compatible API on the server: `POST /v1/chat/completions` (whole or streamed), `GET /v1/models`,
`POST /v1/embeddings`, errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), and the
`Authorization: Bearer KEY` check (`ApiKey`) on every /v1 route when the server has a key.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything without one")

Images come inline only, as `data:image/...;base64,` URLs: the server never fetches a URL or opens a path.
Whole answers go through the dynamic batcher (job "chat": `vl.chats.batch_turns` for a batch of several
conversations; a batch of one is `vl.chats.answer`, which reuses a kept conversation's past). Streamed
answers run on their own thread through `vl.stream_chat` (at most `max_streams` at once, as /v1/ask/stream).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from mmgpt.serve import schemas
from mmgpt.serve.app import Work
from mmgpt.serve.inputs import decode_images, parse_body
from mmgpt.serve.openai_schemas import (
    ChatRequest,
    EmbeddingRequest,
    ImagePart,
    OpenAIError,
    StopScanner,
    cut_at_stop,
    error_responses,
    generation,
    image_blob,
)
from mmgpt.serve.streaming import END, StreamSlot, next_piece, sse

log = logging.getLogger(__name__)


# --- errors and the key ------------------------------------------------------------------------------


def _where(loc: Sequence) -> str:
    """('body', 'messages', 0, 'content', 'list[...]', 1) -> 'messages[0].content[1]' (pydantic's names of
    union branches and models left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and part.isidentifier() and part != "str" and not part[:1].isupper():
            out += f".{part}" if out else part
    return out


def _from_validation(err: RequestValidationError) -> OpenAIError:
    """The most specific of pydantic's errors (the longest location: a union's other branches say less)."""
    first = max(err.errors(), key=lambda e: len(e.get("loc", ())))
    where = _where(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return OpenAIError(400, f"unrecognized request argument supplied: {where}", where, "unknown_parameter")
    msg = first.get("msg", "invalid value")
    return OpenAIError(400, f"{where}: {msg}" if where else msg, where or None, "invalid_value")


class _OpenAIRoute(APIRoute):
    """Routes whose errors (bad fields, images, limits, timeouts) come back in OpenAI's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except OpenAIError as err:
                return err.response()
            except RequestValidationError as err:
                return _from_validation(err).response()
            except HTTPException as err:  # the body limit (413) and the other agents' checks
                return OpenAIError(err.status_code, str(err.detail)).response()

        return route


class ApiKey:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer KEY` (401 in OpenAI's shape else);
    the page, /health and /docs stay open."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                what = "no API key given" if not given else "incorrect API key"
                err = OpenAIError(401, f"{what}: send the server's key as 'Authorization: Bearer KEY' "
                                       "(the openai client's api_key)", code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- inputs ------------------------------------------------------------------------------------------


async def decode(blobs: list[bytes], wheres: list[str], limits) -> list:
    """Image bytes -> RGB images through the server's own decoding and limits; errors name the part."""
    try:
        return await decode_images(blobs, "images", limits)
    except HTTPException as err:
        found = re.match(r"images\[(\d+)\]: (.*)", str(err.detail))
        where = wheres[int(found.group(1))] if found else None
        message = f"{where}: {found.group(2)}" if found else str(err.detail)
        if err.status_code == 413:
            raise OpenAIError(413, message, where, "image_too_large") from None
        raise OpenAIError(400, message, where, "invalid_image") from None


async def conversation(req: ChatRequest, limits, max_images: int) -> list[dict]:
    """OpenAI messages -> mmgpt.conversation messages whose image parts carry decoded PIL images."""
    msgs, blobs, wheres = [], [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        parts: list[dict] = []
        content = m.content if isinstance(m.content, list) else [m.content or ""]
        for j, part in enumerate(content):
            if isinstance(part, ImagePart):
                where = f"messages[{i}].content[{j}].image_url"
                blobs.append(image_blob(part.image_url.url, where))
                wheres.append(where)
                parts.append({"type": "image"})
            elif text := (part if isinstance(part, str) else part.text):
                parts.append({"type": "text", "text": text})
        msgs.append({"role": role, "content": parts})
    if msgs[-1]["role"] != "user":
        raise OpenAIError(400, f"messages[{len(msgs) - 1}]: the last message must be the user's", "messages")
    if not blobs:
        raise OpenAIError(400, "this model answers about images: put at least one image_url part (a "
                               "data:image/...;base64, URL) in a user message", "messages", "image_required")
    if len(blobs) > min(max_images, schemas.MAX_IMAGES):
        raise OpenAIError(400, f"{len(blobs)} images in the conversation, and this model reads at most "
                               f"{min(max_images, schemas.MAX_IMAGES)}", "messages", "too_many_images")
    images = iter(await decode(blobs, wheres, limits))
    for m in msgs:
        m["content"] = [{"type": "image", "image": next(images)} if p["type"] == "image" else p for p in m["content"]]
    return msgs


@contextlib.contextmanager
def _seeded(pipeline, seed: int | None):
    """Sampling from `seed` inside, the global generator as it was after (best effort: concurrent streams
    draw from the same generator)."""
    if seed is None:
        yield
        return
    device = torch.device(getattr(pipeline, "device", "cpu"))
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def run_chat(pipeline, items: list, options: dict) -> list:
    """The batcher's "chat" job: ChatTurns for conversations (one: the kept past reused)."""
    gen = dict(options)
    with _seeded(pipeline, gen.pop("seed", None)):
        if len(items) == 1:
            return [pipeline.chats.answer(items[0], **gen)]
        return pipeline.chats.batch_turns(items, gen)


def _json_body(model) -> dict:
    """OpenAPI request body of a route that reads its JSON itself: `model`'s schema, its $defs written in
    place (they would be looked up at the document's root)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            # a discriminator's mapping names $defs too; the property name alone picks the branch
            return {k: {"propertyName": v["propertyName"]} if k == "discriminator" else inline(v)
                    for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# --- routes ------------------------------------------------------------------------------------------


@dataclass
class _OpenAIServing:
    """What the OpenAI routes share: the app's pipeline, batcher and limits, the model card, the stream slots."""

    name: str
    pipeline: object
    batcher: object
    config: object  # the app's ServeConfig
    limits: object  # what decode_images checks (pixels, budgets)
    streams: list  # [asyncio.Semaphore], made in the app's lifespan
    default_tokens: int  # what answers get when a request names no max_tokens
    max_images: int  # images one conversation may hold
    started: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.started, "owned_by": "mmgpt"}

    async def within_timeout(self, coro, deadline: float | None = None):
        """`coro`'s result, by `deadline` (time.monotonic(); default: timeout_s from now); errors as OpenAI's."""
        timeout_s = self.config.timeout_s
        remaining = timeout_s if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            return await asyncio.wait_for(coro, remaining)
        except asyncio.TimeoutError:
            raise OpenAIError(504, f"no answer within {timeout_s:g} s; try again when the server is less busy",
                              code="timeout") from None
        except OpenAIError:
            raise
        except ValueError as err:  # the model or the conversation reader refused this input
            raise OpenAIError(400, str(err), "messages") from None


def openai_router(app: FastAPI, name: str, streams: list, default_tokens: int) -> APIRouter:
    """The /v1 OpenAI routes over the app's pipeline, batcher, limits (app.state) and stream slots
    (`streams[0]`, made in the app's lifespan); answers get `default_tokens` when a request names none."""
    pipeline, config = app.state.pipeline, app.state.config
    served = getattr(pipeline, "model", None)
    # cross-attention reads config.max_images images; prefix fusion puts any number at their placeholders
    max_images = (schemas.MAX_IMAGES if getattr(served, "uses_prefix", False)
                  else int(getattr(getattr(served, "config", None), "max_images", 1) or 1))
    s = _OpenAIServing(name, pipeline, app.state.batcher, config, getattr(app.state, "images", config.max_pixels),
                streams, default_tokens, max_images)
    router = APIRouter(prefix="/v1", route_class=_OpenAIRoute, tags=["OpenAI-compatible"])

    @router.get("/models", responses=error_responses(401))
    async def models() -> dict:
        return {"object": "list", "data": [s.card()]}

    @router.get("/models/{model_id:path}", responses=error_responses(401, 404))
    async def model(model_id: str) -> dict:
        if model_id != name:
            raise OpenAIError(404, f"the model {model_id!r} is not served here; this server serves {name!r}",
                              "model", "model_not_found")
        return s.card()

    @router.post("/chat/completions", openapi_extra=_json_body(ChatRequest), responses={
        **error_responses(400, 401, 413, 504),
        200: {"content": {"application/json": {}, "text/event-stream": {}},
              "description": "a chat.completion, or with `stream` server-sent chat.completion.chunk events and "
                             "`data: [DONE]`"}})
    async def chat_completions(request: Request):
        """OpenAI's chat completions: a whole answer (JSON) or, with `stream`, server-sent chunks."""
        return await _chat_completion(s, request)

    @router.post("/embeddings", openapi_extra=_json_body(EmbeddingRequest),
                 responses=error_responses(400, 401, 413, 504))
    async def embeddings(request: Request) -> dict:
        """OpenAI's embeddings: texts (and, an mmgpt extension, data-URL images) -> L2-normed vectors in one
        space, so text-image cosine similarities are dot products."""
        return await s.within_timeout(_embeddings(s, request))

    return router


async def _chat_completion(s: _OpenAIServing, request: Request):
    """A chat.completion through the batcher, or the streamed chunks."""
    deadline = time.monotonic() + s.config.timeout_s  # one limit for the whole request, queueing included
    req = await s.within_timeout(parse_body(request, ChatRequest, s.config.max_upload_bytes), deadline)
    msgs = await s.within_timeout(conversation(req, s.limits, s.max_images), deadline)
    gen = generation(req, s.default_tokens)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or s.name}
    if req.stream:
        return await _stream(s, req, msgs, gen, head, deadline)
    work = Work("chat", tuple(sorted(gen.items())))
    (turn,) = await s.within_timeout(s.batcher.submit_many(work, [msgs]), deadline)
    text, stopped = cut_at_stop(turn.text, req.stop or [])
    return {**head, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": "stop" if stopped else turn.finish_reason}],
            "usage": _usage(turn.prompt_tokens, turn.completion_tokens, turn.reused_tokens)}


async def _stream(s: _OpenAIServing, req: ChatRequest, msgs: list[dict], gen: dict, head: dict,
                  deadline: float) -> StreamingResponse:
    """The answer as server-sent chat.completion.chunk events, generated on its own thread in a stream slot."""
    slot = StreamSlot(s.streams)

    def begin():
        seed = gen.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)  # best effort: other streams sample from the same generator
        return s.pipeline.stream_chat(msgs, stopping_criteria=slot.stopping_criteria(), **gen)

    start = slot.start(begin, unread_s=lambda: max(deadline - time.monotonic(), 0))
    pieces, first = await s.within_timeout(start, deadline)
    return StreamingResponse(_chunks(s, req, head, slot, pieces, first, deadline), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


async def _chunks(s: _OpenAIServing, req: ChatRequest, head: dict, slot: StreamSlot, pieces, first,
                  deadline: float) -> AsyncIterator[str]:
    """The events of a streamed answer: the role, the text (cut at a stop string), the finish reason, the
    usage when asked for, `data: [DONE]`; errors after the status line go in the stream."""
    usage_too = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        body = {**head, "object": "chat.completion.chunk", "system_fingerprint": None,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}]}
        if usage_too:
            body["usage"] = usage
        return sse(body)

    scanner, piece, stopped = StopScanner(req.stop or []), first, False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while piece is not END:
            text, stopped = scanner.feed(piece)
            if text:
                yield chunk({"content": text})
            if stopped:
                slot.cancel.set()  # generate() ends at its next token
                break
            piece = await next_piece(pieces, deadline)
        if not stopped and scanner.held:
            yield chunk({"content": scanner.held})
        while piece is not END:  # what generate() made before it saw the cancel
            piece = await next_piece(pieces, deadline)
        turn = getattr(pieces, "turn", None)  # a ChatStream knows its ChatTurn once it has ended
        yield chunk({}, "stop" if stopped or turn is None else turn.finish_reason)
        if usage_too and turn is not None:
            yield chunk(None, usage=_usage(turn.prompt_tokens, turn.completion_tokens, turn.reused_tokens))
    except asyncio.TimeoutError:
        yield sse(OpenAIError(504, f"no full answer within {s.config.timeout_s:g} s", code="timeout").body())
    except Exception as err:  # the status line is sent; the error goes in the stream
        log.exception("streamed chat answer failed")
        yield sse(OpenAIError(500, f"generation failed ({type(err).__name__})").body())
    finally:
        slot.release()  # ends generate() early when the client went away or time ran out
    yield "data: [DONE]\n\n"


async def _embeddings(s: _OpenAIServing, request: Request) -> dict:
    """OpenAI's embeddings list for texts and data-URL images, through the batcher."""
    req = await parse_body(request, EmbeddingRequest, s.config.max_upload_bytes)
    items = [req.input] if isinstance(req.input, str) else req.input
    if not items:
        raise OpenAIError(400, "input: give at least one text", "input")
    dim = s.pipeline.model.config.projection_dim
    if req.dimensions not in (None, dim):
        raise OpenAIError(400, f"dimensions: this model's embeddings have {dim}", "dimensions")
    texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
    pics = [(i, t) for i, t in enumerate(items) if not isinstance(t, str)]
    if len(texts) > schemas.MAX_TEXTS or len(pics) > schemas.MAX_IMAGES:
        raise OpenAIError(400, f"input: at most {schemas.MAX_TEXTS} texts and {schemas.MAX_IMAGES} "
                               "images per request", "input")
    wheres = [f"input[{i}].image_url" for i, _ in pics]
    blobs = [image_blob(p.image_url.url, w) for (_, p), w in zip(pics, wheres)]
    images = await decode(blobs, wheres, s.limits)
    img, txt = await asyncio.gather(s.batcher.submit_many(Work("embed_image"), images),
                                    s.batcher.submit_many(Work("embed_text"), [t for _, t in texts]))
    vectors = dict(zip([i for i, _ in pics], img)) | dict(zip([i for i, _ in texts], txt))
    tokens = 0
    if texts:
        mask = s.pipeline.processor.batch_texts([t for _, t in texts])["attention_mask"]
        tokens = int(mask.sum())

    def encoded(v: torch.Tensor):
        if req.encoding_format == "base64":  # little-endian float32, as OpenAI's API sends it
            return base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
        return v.float().tolist()

    return {"object": "list", "model": req.model or s.name,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(vectors[i])} for i in range(len(items))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
