"""`mmgpt serve MODEL`: the model over HTTP (JSON endpoints, /docs, and a web page at /).

Listens on 127.0.0.1 unless --host says otherwise. fastapi and uvicorn are imported inside run():
`mmgpt --help` works without the `serve` extra installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from mmgpt.commands.use import _add_common, _load_pipeline, quiet

_NO_KEY_WARNING = """
**************************************************************************************************
 WARNING: mmgpt serve listens on {host}, reachable from other machines, and has NO API KEY:
 anyone who reaches this port can use the model. Give one with --api-key KEY (or MMGPT_API_KEY);
 clients then send 'Authorization: Bearer KEY' (the openai client's api_key).
**************************************************************************************************"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch-size", type=int, default=16, metavar="B",
                        help="most requests run in one model call (default: 16; 1 turns batching off)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                        help="how long a request waits for others to join its batch (default: 10)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                        help="largest request body (default: 10)")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                        help="largest image, width x height (default: 4096 x 4096)")
    parser.add_argument("--max-request-pixels", type=int, default=4 * 4096 * 4096, metavar="N",
                        help="most pixels one request's images may have in all (default: 4 x 4096 x 4096); "
                             "images far larger than the model's input are decoded reduced")
    parser.add_argument("--max-inflight-pixels", type=int, default=8 * 4096 * 4096, metavar="N",
                        help="most pixels decoded at once over all requests; more wait (default: 8 x 4096 x 4096)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin (e.g. http://localhost:3000; '*' for any) whose pages may call the API; "
                             "repeat for several. Other cross-origin requests are refused (403)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds a request may take, queueing included (default: 30)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 route, the OpenAI-compatible API "
                             "included (default: the MMGPT_API_KEY environment variable, else no key)")
    parser.add_argument("--index", default=None, metavar="INDEX",
                        help="a search index of this model (mmgpt index build): adds POST /v1/search and a search "
                             "box to the page")


@quiet
def run(args) -> int:
    from mmgpt.cli import UserError

    try:
        from mmgpt.serve import ServeConfig, create_app
        from mmgpt.serve.app import model_name
        from mmgpt.serve.server import bind, is_loopback, serve
    except ImportError as err:
        raise UserError(f"serving needs fastapi, uvicorn and python-multipart ({err}); "
                        "install them with: pip install 'mmgpt[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    try:
        config = ServeConfig(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels,
            max_request_pixels=args.max_request_pixels,
            max_inflight_pixels=args.max_inflight_pixels,
            timeout_s=args.timeout,
        )
    except ValueError as err:  # name the flag, not the field: "timeout_s must be > 0" -> "--timeout ..."
        msg = str(err)
        for field, flag in (("max_batch_size", "--max-batch-size"), ("max_wait_ms", "--max-wait-ms"),
                            ("max_request_pixels", "--max-request-pixels"),
                            ("max_inflight_pixels", "--max-inflight-pixels"), ("max_pixels", "--max-pixels"),
                            ("timeout_s", "--timeout")):
            msg = msg.replace(field, flag)
        raise UserError(msg) from None
    api_key = args.api_key if args.api_key is not None else (os.environ.get("MMGPT_API_KEY") or None)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key (or MMGPT_API_KEY) is empty: give a key, or leave both out for none")
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err})") from None
    try:
        # on a loopback address only loopback Host names (no DNS rebinding); elsewhere the operator's choice
        hosts = "loopback" if is_loopback(args.host) else None
        vl = _load_pipeline(args)
        search_index = None
        if args.index:  # mmgpt/serve/search.py
            from mmgpt.serve.search import open_search_index

            try:
                search_index = open_search_index(args.index, vl)
            except ValueError as err:
                raise UserError(f"--index: {err}") from None
        app = create_app(vl, **asdict(config), name=model_name(args.model), allowed_hosts=hosts,
                         allowed_origins=args.allow_origin, api_key=api_key, search_index=search_index)
        if not is_loopback(args.host) and not api_key:
            print(_NO_KEY_WARNING.format(host=args.host), file=sys.stderr)
        port = sock.getsockname()[1]
        print(f"mmgpt serve: {args.model} on http://{args.host}:{port}/ (API docs at /docs)", file=sys.stderr)
        serve(app, sock)
    finally:
        sock.close()
    return 0
