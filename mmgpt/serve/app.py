"""The HTTP app: JSON endpoints over a pipeline, dynamic batching, a streaming answer endpoint, the
web page, and the limits (413 body or pixels, 415 not an image, 422 bad fields or options, 504 slow),
behind middleware that every route gets: Host and Origin checks (400, 403), the body size (413) and
the JSON depth (422).

    app = create_app("runs/shapes/final", max_batch_size=16, max_wait_ms=10)
    uvicorn.run(app, host="127.0.0.1", port=8000)

`create_app` also takes a pipeline object (anything with the methods of
`mmgpt.api.VisionLanguagePipeline` used here), so tests can serve a stub in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

from mmgpt.serve import schemas
from mmgpt.serve.batching import DynamicBatcher
from mmgpt.serve.docs import add_docs
from mmgpt.serve.guards import MAX_JSON_DEPTH, HostOriginGuard, JsonDepthLimit
from mmgpt.serve.inputs import (
    BodyLimit,
    ImageLimits,
    ImageLimitsScope,
    PixelBudget,
    decode_images,
    parse_body,
)
from mmgpt.serve.page import render_page
from mmgpt.serve.streaming import StreamSlot, answer_events


@dataclass(frozen=True)
class ServeConfig:
    """Batching and limits of one server; checked once, here."""

    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_upload_bytes: int = 10 * 2**20  # a whole request body
    max_pixels: int = 4096 * 4096  # per image, checked from the header before decoding
    max_request_pixels: int = 4 * 4096 * 4096  # all images of one request (a 16 x 4096^2 request: 413)
    max_inflight_pixels: int = 8 * 4096 * 4096  # being decoded at once, all requests; more wait their turn
    timeout_s: float = 30.0  # per request, queueing included
    max_streams: int = 4  # streaming answers generated at once; more wait their turn

    def __post_init__(self):
        for name in ("max_batch_size", "max_upload_bytes", "max_pixels", "max_request_pixels", "max_inflight_pixels",
                     "max_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for small, large in (("max_pixels", "max_request_pixels"), ("max_request_pixels", "max_inflight_pixels")):
            if getattr(self, large) < getattr(self, small):
                raise ValueError(f"{large} ({getattr(self, large)}) must be >= {small} ({getattr(self, small)})")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class Work:
    """What one model call does; requests with equal Work share batches."""

    task: str  # caption | ask | embed_image | embed_text | chat
    options: tuple = ()


def _bounded_defaults(pipeline) -> dict:
    """What a request that leaves the generation options out gets: the model's saved generation_config
    (else 32 new tokens, greedy, as `mmgpt.load` does), within the bounds a request may ask for."""
    gc = getattr(getattr(pipeline, "model", None), "generation_config", None)
    tokens = getattr(gc, "max_new_tokens", None) or 32
    beams = getattr(gc, "num_beams", None) or 1
    return {"max_new_tokens": min(int(tokens), schemas.MAX_NEW_TOKENS), "num_beams": min(int(beams), schemas.MAX_BEAMS)}


def run_batch(pipeline, work: Work, items: list) -> list:
    """One model call for a batch of items (runs in the batcher's thread)."""
    opts = dict(work.options)
    if work.task == "caption":
        return pipeline.caption(items, batch_size=len(items), **opts)
    if work.task == "ask":
        images, questions = zip(*items)
        return pipeline.ask(list(images), list(questions), batch_size=len(items), **opts)
    if work.task == "embed_image":
        return list(pipeline.embed_images(items, batch_size=len(items)))  # rows of (N, E)
    if work.task == "embed_text":
        return list(pipeline.embed_texts(items, batch_size=len(items)))
    if work.task == "chat":  # conversations -> ChatTurns (the OpenAI-compatible API's)
        from mmgpt.serve.openai_api import run_chat

        return run_chat(pipeline, items, opts)
    raise ValueError(f"unknown task {work.task!r}")


def model_name(path: str | os.PathLike) -> str:
    """How clients see a model: a folder by its name only (not where it lies), a hub id as given."""
    path = Path(path)
    return path.name if path.is_dir() else os.fspath(path)


def _load(pipeline_or_model_dir, device, dtype):
    if isinstance(pipeline_or_model_dir, str | os.PathLike):
        from mmgpt.api import load

        return load(pipeline_or_model_dir, device=device, dtype=dtype), model_name(pipeline_or_model_dir)
    return pipeline_or_model_dir, type(pipeline_or_model_dir).__name__


def _question_limit(pipeline) -> int | None:
    """Positions a question's prompt must stay under: a GPT-2 decoder's n_positions (the model refuses a
    prompt that fills them, leaving no room for the answer). None for decoders without a fixed limit."""
    model, processor = getattr(pipeline, "model", None), getattr(pipeline, "processor", None)
    tc = getattr(getattr(model, "config", None), "text_config", None)
    if processor is None or getattr(tc, "model_type", None) != "gpt2" or getattr(model, "uses_prefix", False):
        return None
    return int(tc.n_positions)


def _body_doc(model: type[BaseModel], question: str | None = None) -> dict:
    """OpenAPI request body for a route that reads JSON or multipart itself, with every error it answers;
    `question`: what the question field's description adds (this model's limit)."""
    schema = model.model_json_schema()
    if question and "question" in schema["properties"]:
        prop = schema["properties"]["question"]
        prop["description"] = f"{prop.get('description', 'the question')}; {question}"
    form = json.loads(json.dumps(schema))
    for name, prop in form["properties"].items():
        if name.startswith("image"):
            binary = {"type": "string", "format": "binary"}
            form["properties"][name] = {**prop, "items": binary} if prop.get("type") == "array" else binary
        elif prop.get("type") == "string":  # a form part is text whatever it looks like ('{}', '5'): no JSON type
            form["properties"][name] = {k: v for k, v in prop.items() if k != "type"}
        elif prop.get("type") == "array" and prop["items"].get("type") == "string":  # one part per item; one part
            text = {k: v for k, v in prop["items"].items() if k != "type"}  # alone is a list of one
            form["properties"][name] = {k: v for k, v in prop.items() if k not in ("type", "items")} | {
                "anyOf": [{"type": "array", "items": text}, text]}
    content = {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}
    return {"requestBody": {"required": True, "content": content}}


ROUTE_ERRORS = schemas.error_responses()  # 400 403 413 415 422 504


@dataclass
class _Serving:
    """What the routes of one app share: the pipeline, its batcher and limits, and the request helpers."""

    pipeline: object
    name: str
    config: ServeConfig
    batcher: DynamicBatcher
    images: ImageLimits
    streams: list  # [asyncio.Semaphore], made in the lifespan, in the loop that serves
    defaults: dict  # the generation options a request leaves out: the model's own, bounded
    question_doc: str | None  # what the question fields' documentation adds (this model's limit)

    def options(self, req) -> tuple:
        """The request's generation options, the model's own (bounded) for those it leaves out."""
        return tuple({**self.defaults, **dict(req.options())}.items())

    async def within_timeout(self, coro):
        timeout_s = self.config.timeout_s
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise HTTPException(504, f"no answer within {timeout_s:g} s; try again when the server is less busy")
        except ValueError as err:  # the model refused this input (e.g. a question longer than the decoder reads)
            raise HTTPException(422, str(err)) from None

    async def body(self, request: Request, model: type[schemas.Body]):
        return await parse_body(request, model, self.config.max_upload_bytes)


def _question_doc(pipeline) -> str | None:
    """What the question fields' documentation says about this model's limit (None: no fixed limit)."""
    limit = _question_limit(pipeline)
    if limit is None:
        return None
    room = limit - 1 - len(pipeline.processor.encode_prompt("vqa", ""))
    return (f"at most {room} tokens of this model's tokenizer (its decoder reads {limit} positions, "
            "the prompt included); a longer question is answered 422")


def create_app(
    pipeline_or_model_dir,
    max_batch_size: int = 16,
    max_wait_ms: float = 10.0,
    max_upload_bytes: int = ServeConfig.max_upload_bytes,
    max_pixels: int = ServeConfig.max_pixels,
    timeout_s: float = ServeConfig.timeout_s,
    max_streams: int = ServeConfig.max_streams,
    max_request_pixels: int = ServeConfig.max_request_pixels,
    max_inflight_pixels: int = ServeConfig.max_inflight_pixels,
    device=None,
    dtype=None,
    name: str | None = None,
    search_index=None,
    allowed_hosts: str | list[str] | None = None,
    allowed_origins: list[str] | tuple[str, ...] = (),
    api_key: str | None = None,
) -> FastAPI:
    """A FastAPI app serving a pipeline, or the model in a folder (loaded here, once, on `device`
    in `dtype`). `name` is shown on the page and in /health (default: the folder's name).

    `allowed_hosts`: the Host names answered (None: any; "loopback": loopback names only, what
    `mmgpt serve` sets on a loopback address). `allowed_origins`: web origins (e.g.
    "http://localhost:3000", or "*") whose pages may call the API; other cross-origin requests get 403.
    `api_key`: when given, every /v1 route needs `Authorization: Bearer <api_key>` (401 else)."""
    config = ServeConfig(max_batch_size, max_wait_ms, max_upload_bytes, max_pixels, max_request_pixels,
                         max_inflight_pixels, timeout_s, max_streams)
    pipeline, default_name = _load(pipeline_or_model_dir, device, dtype)
    name = name or default_name
    batcher = DynamicBatcher(lambda work, items: run_batch(pipeline, work, items), max_batch_size, max_wait_ms)
    streams: list[asyncio.Semaphore] = []  # made in the lifespan, in the loop that serves
    page = render_page(name, max_upload_bytes)
    if search_index is not None:  # `mmgpt serve --index`: /v1/search and a search box (mmgpt/serve/search.py)
        from mmgpt.serve.search import add_search_section, search_router

        page = add_search_section(page)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        streams[:] = [asyncio.Semaphore(max_streams)]
        yield
        await batcher.stop()

    app = FastAPI(
        title=f"mmgpt: {name}",
        summary="Caption images, answer questions about them, embed and compare images and texts.",
        lifespan=lifespan,
        docs_url=None,  # add_docs: the same pages, their scripts and styles served from here (no CDN)
        redoc_url=None,
    )
    add_docs(app)
    processor = getattr(pipeline, "processor", None)
    images = ImageLimits(max_pixels, max_request_pixels, PixelBudget(max_inflight_pixels),
                         side=getattr(processor, "image_size", None))
    _add_middleware(app, images, max_upload_bytes, api_key, allowed_hosts, allowed_origins)
    if search_index is not None:
        app.include_router(search_router(search_index, lambda task, items: batcher.submit_many(Work(task), items),
                                         max_pixels, max_upload_bytes, timeout_s))
    app.state.config, app.state.batcher, app.state.pipeline, app.state.images = config, batcher, pipeline, images
    serving = _Serving(pipeline, name, config, batcher, images, streams, _bounded_defaults(pipeline),
                       _question_doc(pipeline))
    _add_page_and_health(app, serving, page)
    _add_image_routes(app, serving)
    _add_stream_route(app, serving)
    from mmgpt.serve.openai_api import openai_router  # imports this module: not at the top

    app.include_router(openai_router(app, name, streams, serving.defaults["max_new_tokens"]))
    return app


def _add_middleware(app: FastAPI, images: ImageLimits, max_upload_bytes: int, api_key: str | None,
                    allowed_hosts, allowed_origins) -> None:
    """Outermost last: who may call (Host, Origin), CORS answers for allowed origins, the API key, the body
    size, the JSON depth, the image budgets (every route, present and future, gets them all)."""
    from mmgpt.serve.openai_api import ApiKey  # imports this module: not at the top

    app.add_middleware(ImageLimitsScope, limits=images)
    app.add_middleware(JsonDepthLimit, max_depth=MAX_JSON_DEPTH)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    if api_key:  # every /v1 route, the OpenAI-compatible ones and the rest; inside CORS (preflights answered)
        app.add_middleware(ApiKey, key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(HostOriginGuard, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)


def _add_page_and_health(app: FastAPI, s: _Serving, page: str) -> None:
    """The web page at / and GET /health."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health", responses={503: {"description": "the batch worker is not running"},
                                   **schemas.error_responses(400, 403)})
    async def health() -> JSONResponse:
        return JSONResponse(status_code=200 if s.batcher.running else 503, content={
            "status": "ok" if s.batcher.running else "unavailable",
            "model": s.name,
            "device": str(getattr(s.pipeline, "device", "unknown")),
            "queued": s.batcher.queued,
            "batches": asdict(s.batcher.stats),
            "config": asdict(s.config),
        })


def _add_image_routes(app: FastAPI, s: _Serving) -> None:
    """POST /v1/caption, /v1/ask, /v1/embed and /v1/similarity: whole answers through the batcher."""

    @app.post("/v1/caption", response_model=schemas.CaptionResponse, openapi_extra=_body_doc(schemas.CaptionRequest),
              responses=ROUTE_ERRORS)
    async def caption(request: Request) -> schemas.CaptionResponse:
        async def go():
            req = await s.body(request, schemas.CaptionRequest)
            images = await decode_images(req.images, "images", s.images)
            captions = await s.batcher.submit_many(Work("caption", s.options(req)), images)
            return schemas.CaptionResponse(captions=captions)

        return await s.within_timeout(go())

    @app.post("/v1/ask", response_model=schemas.AskResponse,
              openapi_extra=_body_doc(schemas.AskRequest, s.question_doc), responses=ROUTE_ERRORS)
    async def ask(request: Request) -> schemas.AskResponse:
        async def go():
            req = await s.body(request, schemas.AskRequest)
            images = await decode_images(req.images, "images", s.images)
            items = [(im, req.question) for im in images]
            return schemas.AskResponse(answers=await s.batcher.submit_many(Work("ask", s.options(req)), items))

        return await s.within_timeout(go())

    async def embed_all(images: list[bytes], texts: list[str]) -> tuple[list, list]:
        decoded = await decode_images(images, "images", s.images)
        return await asyncio.gather(
            s.batcher.submit_many(Work("embed_image"), decoded), s.batcher.submit_many(Work("embed_text"), texts)
        )

    @app.post("/v1/embed", response_model=schemas.EmbedResponse, openapi_extra=_body_doc(schemas.EmbedRequest),
              responses=ROUTE_ERRORS)
    async def embed(request: Request) -> schemas.EmbedResponse:
        async def go():
            req = await s.body(request, schemas.EmbedRequest)
            img, txt = await embed_all(req.images, req.texts)
            return schemas.EmbedResponse(image_embeddings=[e.tolist() for e in img],
                                         text_embeddings=[e.tolist() for e in txt])

        return await s.within_timeout(go())

    @app.post(
        "/v1/similarity", response_model=schemas.SimilarityResponse, openapi_extra=_body_doc(schemas.SimilarityRequest),
        responses=ROUTE_ERRORS,
    )
    async def similarity(request: Request) -> schemas.SimilarityResponse:
        async def go():
            req = await s.body(request, schemas.SimilarityRequest)
            img, txt = await embed_all(req.images, req.texts)
            sim = torch.stack(img) @ torch.stack(txt).T  # (N_img, E) @ (E, N_txt): cosine, both L2-normed
            return schemas.SimilarityResponse(similarity=sim.tolist())

        return await s.within_timeout(go())


def _add_stream_route(app: FastAPI, s: _Serving) -> None:
    """POST /v1/ask/stream: one answer as server-sent events, at most `max_streams` generated at once."""
    timeout_s = s.config.timeout_s

    @app.post(
        "/v1/ask/stream",
        response_class=StreamingResponse,
        openapi_extra=_body_doc(schemas.AskStreamRequest, s.question_doc),
        responses={**ROUTE_ERRORS, 200: {"content": {"text/event-stream": {}},
                         "description": 'server-sent events: `data: {"text": piece}` per piece, then '
                                        '`event: done` with `{"answer": ...}`, or `event: error` with `{"detail": ...}`'}},
    )
    async def ask_stream(request: Request) -> StreamingResponse:
        """Answer one question about one image, piece by piece as it is generated."""
        deadline = time.monotonic() + timeout_s
        slot = StreamSlot(s.streams)

        async def start() -> tuple[Iterator[str], object]:
            req = await s.body(request, schemas.AskStreamRequest)
            (image,) = await decode_images([req.image], "image", s.images)
            gen = {"stopping_criteria": slot.stopping_criteria(), "num_beams": 1,
                   "max_new_tokens": req.max_new_tokens or s.defaults["max_new_tokens"]}
            return await slot.start(lambda: s.pipeline.stream_answer(image, req.question, **gen), lambda: timeout_s)

        pieces, first = await s.within_timeout(start())
        return StreamingResponse(answer_events(pieces, first, slot, deadline, timeout_s),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})
