"""Serve a model over HTTP: JSON endpoints with dynamic batching, a streaming answer endpoint and a
web page. Needs the `serve` extra (fastapi, uvicorn, python-multipart); `mmgpt serve MODEL` runs it."""

from mmgpt.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
