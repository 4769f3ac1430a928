"""Search routes of `mmgpt serve MODEL --index INDEX`, and the page's search box.

- `POST /v1/search`: `{"text": ..., "top_k": 10}` (JSON) or an `image` upload (multipart, or base64 in
  JSON) -> the best images of the index with their cosine scores. The query image travels in the body;
  no field names a path.
- `GET /v1/search/images/{id}`: the file of an indexed image, by its index id only. The path comes from
  the index's database and must lie inside the indexed folder; nothing a client names is opened.
"""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import Awaitable, Callable
from typing import Any  # noqa: F401 - pydantic resolves schemas.Body's inherited validator hints here

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, model_validator

from mmgpt.serve import schemas
from mmgpt.serve.inputs import decode_images, parse_body

MAX_TOP_K = 100
ERRORS = schemas.error_responses() if hasattr(schemas, "error_responses") else {}


def open_search_index(path, pipeline):
    """The index at ``path``, checked to hold this pipeline's model; ValueError (one line) else."""
    from mmgpt.search import SearchIndex

    index = SearchIndex(path)
    index.check_model(pipeline)
    return index


class SearchRequest(schemas.Body):
    text: schemas.Text | None = Field(None, description="what to look for (or give an image)")
    image: schemas.ImageData | None = Field(None, description="find images like this one (or give a text)")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="how many images to return")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.text is None) == (self.image is None):
            raise ValueError("give a text or an image to search for, not both")
        return self


class SearchHit(BaseModel):
    id: int = Field(description="the image's id in the index; its file is GET /v1/search/images/{id}")
    path: str = Field(description="the image's path inside the indexed folder")
    score: float = Field(description="cosine similarity with the query")
    url: str


class SearchResponse(BaseModel):
    results: list[SearchHit]
    images: int = Field(description="images in the index")
    approximate: bool = Field(description="HNSW (approximate) rather than exact search")


def search_router(index, embed: Callable[[str, list], Awaitable[list]], max_pixels: int,
                  max_upload_bytes: int, timeout_s: float) -> APIRouter:
    """Routes over an opened `mmgpt.search.SearchIndex`; ``embed(task, items)`` runs "embed_text" or
    "embed_image" through the server's batcher."""
    router = APIRouter(tags=["search"])
    root = index.root.resolve()

    @router.post("/v1/search", response_model=SearchResponse, responses=ERRORS,
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": SearchRequest.model_json_schema()}}}})
    async def search(request: Request) -> SearchResponse:
        async def go() -> SearchResponse:
            req = await parse_body(request, SearchRequest, max_upload_bytes)
            if req.image is not None:
                (image,) = await decode_images([req.image], "image", max_pixels)
                (vec,) = await embed("embed_image", [image])
            else:
                (vec,) = await embed("embed_text", [req.text])
            hits = (await asyncio.to_thread(index.search, vec[None], req.top_k))[0]
            return SearchResponse(
                results=[SearchHit(id=h.id, path=h.path, score=h.score, url=f"/v1/search/images/{h.id}")
                         for h in hits],
                images=len(index), approximate=index.approximate)

        try:
            return await asyncio.wait_for(go(), timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within {timeout_s:g} s; try again when the server is less busy")

    @router.get("/v1/search/images/{image_id}", response_class=FileResponse,
                responses={404: {"description": "no such image in the index, or its file is gone"}})
    async def image(image_id: int) -> FileResponse:
        path = await asyncio.to_thread(index.path_of, image_id)
        if path is None:
            raise HTTPException(404, f"no image {image_id} in the index")
        real = path.resolve()
        if not real.is_relative_to(root) or not real.is_file():  # a link out of the folder, or deleted since
            raise HTTPException(404, f"image {image_id} is no longer in the indexed folder; update the index")
        kind = mimetypes.guess_type(real.name)[0] or "application/octet-stream"
        return FileResponse(real, media_type=kind, headers={"X-Content-Type-Options": "nosniff",
                                                            "Cache-Control": "private, max-age=60"})

    return router


SECTION = """
<section id="search" style="max-width: 56rem; margin: 2rem auto; padding: 0 1rem;">
  <h2>Search the collection</h2>
  <form id="search-form" style="display: flex; gap: .5rem;">
    <input id="search-text" placeholder="a red circle next to a blue square" maxlength="1000"
           autocomplete="off" style="flex: 1; padding: .4rem; font: inherit;">
    <input id="search-image" type="file" accept="image/*" title="or search with an image" style="max-width: 14rem;">
    <button type="submit">Search</button>
  </form>
  <p id="search-status" role="status" style="color: #777;"></p>
  <div id="search-results" style="display: grid; grid-template-columns: repeat(auto-fill, minmax(9rem, 1fr));
       gap: .6rem;"></div>
</section>
<script>
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  // the page's API key field (its headers()), so that a server started with --api-key answers the box too
  const auth = (extra) => (typeof headers === "function" ? headers(extra) : extra);
  let turn = 0;
  async function search(ev) {
    ev.preventDefault();
    const text = $("search-text").value.trim(), file = $("search-image").files[0];
    if (!text && !file) return;
    const mine = ++turn;
    let init;
    if (file) {
      const body = new FormData();
      body.append("image", file);
      body.append("top_k", "12");
      init = { method: "POST", body, headers: auth({}) };
    } else {
      init = { method: "POST", headers: auth({ "Content-Type": "application/json" }),
               body: JSON.stringify({ text, top_k: 12 }) };
    }
    $("search-status").textContent = "searching…";
    try {
      const r = await fetch("/v1/search", init);
      const j = await r.json();
      if (mine !== turn) return;
      if (!r.ok) {
        const d = j.detail;
        $("search-status").textContent = Array.isArray(d) ? d.map((e) => e.msg).join("; ") : (d || r.status);
        return;
      }
      $("search-status").textContent = `${j.results.length} of ${j.images} images` +
        (j.approximate ? " (approximate search)" : "");
      const grid = $("search-results");
      grid.replaceChildren();
      for (const hit of j.results) {
        const fig = document.createElement("figure");
        fig.style.margin = "0";
        const img = document.createElement("img");
        const key = auth({}).Authorization;
        if (key) {  // an <img> cannot send the key: fetch the thumbnail with it
          fetch(hit.url, { headers: { Authorization: key } }).then((r) => (r.ok ? r.blob() : null))
            .then((b) => { if (b) img.src = URL.createObjectURL(b); }).catch(() => {});
        } else {
          img.src = hit.url;
        }
        img.alt = hit.path;
        img.title = hit.path;
        img.loading = "lazy";
        img.style.cssText = "width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; background: #eee;";
        const cap = document.createElement("figcaption");
        cap.textContent = hit.score.toFixed(3);
        cap.style.cssText = "font-size: .8rem; color: #555; text-align: center;";
        fig.append(img, cap);
        grid.append(fig);
      }
    } catch (err) { if (mine === turn) $("search-status").textContent = String(err); }
  }
  $("search-form").addEventListener("submit", search);
  $("search-image").addEventListener("change", () => { if ($("search-image").files[0]) $("search-text").value = ""; });
})();
</script>
"""


def add_search_section(page: str) -> str:
    """The page with the search box and result grid added at the end of its body."""
    return page.replace("</body>", SECTION + "</body>", 1)
