"""The API documentation pages (/docs, /redoc) work offline: every script, style and icon they reference
is on this server (served from the fastapi-offline package's files), and an API key leaves them open.
Their rendering in Chromium is checked in test_serve_browser.py."""

from __future__ import annotations

from html.parser import HTMLParser
from importlib.resources import files
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
from fastapi.testclient import TestClient
from test_serve import StubPipeline

from mmgpt.serve import create_app

PAGES = ("/docs", "/redoc")
KINDS = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class _Links(HTMLParser):
    """Every src and href of a page."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(StubPipeline(), api_key="sk-test")) as c:
        yield c


@pytest.mark.parametrize("path", PAGES)
def test_docs_pages_reference_only_files_of_this_server(client, path):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = links(r.text)
    assert urls, f"{path} references no script or style"
    assert "http://" not in r.text and "https://" not in r.text  # not in the inline script either
    assert any(u.endswith(".js") for u in urls)
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/docs/static/"), url
        asset = client.get(url)  # no key: the pages' files stay open as the pages do
        assert asset.status_code == 200, url
        kind = KINDS[url[url.rindex("."):]]
        assert asset.headers["content-type"].startswith(kind), (url, asset.headers["content-type"])
        assert len(asset.content) > (1000 if kind == "image/png" else 50_000), url
        # the package's own files, byte for byte
        assert asset.content == (files("fastapi_offline") / "static" / url.rsplit("/", 1)[1]).read_bytes()


def test_swagger_ui_gets_this_servers_schema_and_oauth2_redirect(client):
    html = client.get("/docs").text
    assert "url: '/openapi.json'" in html and "'/docs/oauth2-redirect'" in html
    assert "<title>mmgpt: StubPipeline - Swagger UI</title>" in html
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.head("/docs").status_code == 200  # GET and HEAD, as FastAPI's own pages


def test_an_api_key_guards_v1_only(client):
    for path in (*PAGES, "/docs/oauth2-redirect", "/openapi.json", "/health", "/"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200


def test_unknown_or_escaping_asset_paths_are_404(client):
    for path in ("/docs/static/nothing.js", "/docs/static/../core.py", "/docs/static/%2e%2e/core.py"):
        assert client.get(path).status_code == 404, path


def test_docs_follow_the_root_path_behind_a_proxy():
    with TestClient(create_app(StubPipeline()), root_path="/mmgpt") as c:
        html = c.get("/docs").text
    assert "/mmgpt/docs/static/swagger-ui-bundle.js" in html and "url: '/mmgpt/openapi.json'" in html
