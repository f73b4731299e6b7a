"""`cxr serve`: MLflow's scoring app (the one `mlflow models serve` runs) behind a guard.

MLflow's app reads and parses the whole request body before the model sees it, and its 400
answers repeat the request back. The guard, an ASGI middleware in front of it:
- refuses a body over `max_body` bytes with HTTP 400 before MLflow's app sees it: by its
  Content-Length or as soon as the bytes read pass the cap (chunked), the rest read and
  dropped (up to DRAIN_FACTOR caps) so that the client gets the answer: the server never
  holds more than the cap of one request;
- refuses a body whose JSON nests deeper than MAX_DEPTH with HTTP 400: MLflow's parser
  recurses once per level, and 100,000 `[` (200 kB) end in a RecursionError and a 500;
- keeps the reason of a 4xx answer and drops the echoed payload and the stack trace.
The model's own caps (images and pixels per request, pixels per array, the smallest image:
pyfunc_classifier.py) answer 400 too; `--max-megapixels` sets the model's cap on pixels per request.

The port is taken (`listen`) before the model loads, which takes seconds: a port in use
fails at once, and uvicorn serves on that very socket (a client that connects while the
model loads waits for its answer).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from cxr.errors import CxrError

MAX_BODY_BYTES = 32 * 1024 * 1024
DRAIN_FACTOR = 16  # an over-cap body is read and dropped up to this many caps, then cut off
# A request nests 5 deep ({"dataframe_records": [{"pixels": [[...]]}]}); Python's parser
# recurses to ~1,000. Far from both.
MAX_DEPTH = 32

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


_ECHO = re.compile(r"of (?:data )?[`'].*[`'] with (dtype|type|schema) ", re.S)
FORMS = (
    'send {"dataframe_records": [{"image": "<base64 PNG or JPEG>"}, ...]} or '
    '{"dataframe_records": [{"pixels": [[<grey 0-255>, ...], ...]}, ...]}, one form per request'
)
MAX_REASON = 500  # a backstop: an answer never repeats more than this of any request


def reason_only(message: str) -> str:
    """MLflow's error text without the request it repeats: "Failed to predict data '<the
    whole frame>'. \nError: <reason>" and "Failed to enforce schema of data '<frame>' ...
    Error: <reason>" -> "<reason>"; "... Error: ...\nInput: \n<body>" -> the text before
    "Input:"; "of data `<values>` with dtype" -> "of the input with dtype"."""
    original, message = message, message.split("\nInput:", 1)[0]
    if message.startswith(("Failed to predict data", "Failed to enforce schema of data")):
        message = message.rpartition("Error: ")[2]
    message = _ECHO.sub(r"of the input with \1 ", message).strip()
    if "schema" in original or "signature" in original:  # MLflow's checks of the form
        message = f"{message} ({FORMS})"
    return message if len(message) <= MAX_REASON else message[:MAX_REASON] + " [...]"


_NOT_SYNTAX = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_CHUNK = 1 << 20  # characters counted at a time: a few MB of numpy temporaries at most


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON body nest (the most opened and not yet
    closed, strings skipped): how deep MLflow's parser would recurse. Linear and in C, cheap
    next to the parse: bytes methods keep only quotes and brackets, numpy counts."""
    import numpy as np

    # Escapes pair from the left (\\ first, then \"), so this drops every escaped quote and
    # keeps the quotes that open and close strings; JSON has no backslash outside strings.
    kept = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_SYNTAX)
    step = np.zeros(256, np.int64)
    step[list(b"[{")], step[list(b"]}")] = 1, -1
    deepest = level = quotes = 0
    for start in range(0, len(kept), _CHUNK):
        part = np.frombuffer(kept[start : start + _CHUNK], np.uint8)
        is_quote = part == ord('"')
        outside = (quotes + np.cumsum(is_quote)) % 2 == 0  # an even number of quotes before
        levels = level + np.cumsum(np.where(outside, step[part], 0))
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
        quotes += int(is_quote.sum())
    return deepest


def _bad_request(message: str) -> tuple[int, bytes]:
    return 400, json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()


class Guard:
    """ASGI middleware: body cap and nesting cap before parsing, payload-free error answers."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES):
        self.app, self.max_body = app, max_body

    def _too_large(self, size: str) -> tuple[int, bytes]:
        return _bad_request(
            f"the request body ({size}) is over the limit of {self.max_body:,} bytes "
            "(cxr serve --max-body-mb); send fewer or smaller images per request."
        )

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode()
        if declared and not declared.isdigit():
            await _send(send, *self._too_large(f"Content-Length {declared[:20]!r}"))
            return
        over = bool(declared) and int(declared) > self.max_body
        body: list[bytes] = []
        size, more = 0, True
        while more:  # read the body here, up to the cap, then replay it to MLflow's app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            over = over or size > self.max_body
            if over:  # drop what was read; drain the rest (bounded) so that the client,
                body = []  # still sending, reads the answer instead of a reset connection
                if size > DRAIN_FACTOR * self.max_body:
                    break
            else:
                body.append(message.get("body", b""))
        if over:
            await _send(send, *self._too_large(f"{'at least ' if more else ''}{size:,} bytes"))
            return
        whole = b"".join(body)
        depth = json_depth(whole)
        if depth > MAX_DEPTH:
            reason = f"the request body nests arrays and objects {depth:,} deep, over the limit"
            await _send(send, *_bad_request(f"{reason} of {MAX_DEPTH}; {FORMS}."))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the client's disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": whole, "more_body": False}

        await self.app(scope, replay, _payload_free(send))


def _payload_free(send):
    """`send` that rewrites a 4xx JSON answer to its reason (no echo, no stack trace)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            start = message  # held until the body is complete
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        raw = b"".join(chunks)
        try:
            error = json.loads(raw)
            reply = {"error_code": error.get("error_code", "BAD_REQUEST")}
            reply["message"] = reason_only(str(error.get("message", "")))
            raw = json.dumps(reply).encode()
        except (ValueError, AttributeError):
            raw = reason_only(raw.decode("utf-8", "replace")).encode()
        await _send(send, start["status"], raw, start.get("headers"))

    return wrapped


async def _send(send, status: int, body: bytes, headers=None) -> None:
    kept = [(k, v) for k, v in (headers or []) if k.lower() != b"content-length"]
    if not any(k.lower() == b"content-type" for k, _ in kept):
        kept.append((b"content-type", b"application/json"))
    kept.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


def app_for(model_uri: str, max_body: int = MAX_BODY_BYTES, max_pixels: int | None = None) -> Guard:
    """MLflow's scoring app for `model_uri` (the pyfunc loaded once), behind the guard;
    `max_pixels` replaces the classifier's cap on pixels per request (cxr.pyfunc_classifier)."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    if max_pixels is not None:  # a setting of this server, not of the logged model
        model.unwrap_python_model().max_pixels = max_pixels
    return Guard(scoring_server.init(model), max_body)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, for `run`; CxrError in one line if the port is in
    use or the address cannot be had."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        # As uvicorn's own socket: a restart is not refused for the last run's connections
        # in TIME_WAIT; a port that another socket listens on still is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # now: no other process can take the port while the model loads
    except OSError as err:
        sock.close()
        reason = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            raise CxrError(
                f"port {port} on {host} is in use ({reason}): choose another with --port."
            ) from None
        raise CxrError(
            f"cannot listen on {host} port {port} ({reason}): check --host and --port."
        ) from None
    return sock


def run(app: Guard, sock: socket.socket) -> None:
    """Serve `app` on the socket of `listen` until Ctrl-C or SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        uvicorn.Server(config).run(sockets=[sock])
