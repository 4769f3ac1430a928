"""Serve a model over HTTP: JSON endpoints with dynamic batching, a streaming answer endpoint, a web page
and the API docs (/docs). Needs the `serve` extra (fastapi, fastapi-offline, uvicorn, python-multipart);
`mmgpt serve MODEL` runs it."""

from mmgpt.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
