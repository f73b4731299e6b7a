"""The guard in front of MLflow's scoring app (`cxr serve`): unit tests on a stand-in app;
the real server is tested end to end in test_champion.py."""

import asyncio
import json

import pytest

from cxr.server import DRAIN_FACTOR, MAX_REASON, Guard, reason_only


class Recorder:
    """A stand-in for MLflow's app: records the body it read and answers `reply`."""

    def __init__(self, status=200, reply=b'{"predictions": []}'):
        self.status, self.reply, self.bodies = status, reply, []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": self.reply})


def call(guard, chunks, content_length=True):
    """Send `chunks` through the guard as one POST; return (status, body, chunks read)."""
    headers = [(b"content-type", b"application/json")]
    if content_length:
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    queue = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    read, sent = [], []

    async def receive():
        read.append(1)
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    if status >= 400:  # the guard's own or rewritten answer: its length is right
        assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()
    return status, body, len(read)


def test_a_body_under_the_cap_reaches_the_app_whole():
    app = Recorder()
    status, body, _ = call(Guard(app, max_body=100), [b"a" * 60, b"b" * 40])
    assert status == 200 and json.loads(body) == {"predictions": []}
    assert app.bodies == [b"a" * 60 + b"b" * 40]


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_cap_never_reaches_the_app_and_is_drained(declared):
    """Refused whether its length is declared or not (chunked); read and dropped so that
    the client, still sending, gets the answer."""
    app = Recorder()
    status, body, read = call(Guard(app, max_body=100), [b"x" * 60] * 10, declared)
    assert status == 400 and read == 10 and app.bodies == []
    assert json.loads(body)["message"].startswith(
        "the request body (600 bytes) is over the limit of 100 bytes (cxr serve --max-body-mb)"
    )


def test_draining_an_endless_body_stops_at_a_bound():
    app = Recorder()
    chunks = [b"x" * 100] * (DRAIN_FACTOR + 10)
    status, body, read = call(Guard(app, max_body=100), chunks, content_length=False)
    assert status == 400 and read == DRAIN_FACTOR + 1 and app.bodies == []
    assert f"at least {(DRAIN_FACTOR + 1) * 100:,} bytes" in json.loads(body)["message"]


def test_a_length_that_is_not_a_number_is_refused():
    guard = Guard(Recorder())
    scope = {"type": "http", "headers": [(b"content-length", b"-1")]}
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, None, send))
    assert sent[0]["status"] == 400


def test_error_answers_keep_the_reason_and_drop_the_request_and_trace():
    echo = {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "Failed to predict data '   image\n0  SECRETPAYLOAD'. \nError: image 0: "
        "not an image.",
        "stack_trace": "Traceback ... SECRETPAYLOAD",
    }
    app = Recorder(status=400, reply=json.dumps(echo).encode())
    status, body, _ = call(Guard(app), [b"{}"])
    assert status == 400 and b"SECRETPAYLOAD" not in body
    assert json.loads(body) == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "image 0: not an image.",
    }


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "Failed to predict data 'x'. \nError: Failed to enforce schema of data 'SECRET' "
            "with schema 'image'. Error: Must pass 2-d input.",
            "Must pass 2-d input.",
        ),
        (
            "Ensure that input is a valid JSON formatted string. Error: 'JSONDecodeError()'"
            "\nInput: \n{SECRET",
            "Ensure that input is a valid JSON formatted string. Error: 'JSONDecodeError()'",
        ),
        (
            "Failed to enforce schema of data `[1, SECRET]` with dtype `long`",
            "Failed to enforce schema of the input with dtype `long` (send {",
        ),
        ("S" * 2000, "S" * MAX_REASON + " [...]"),
    ],
)
def test_reason_only(message, reason):
    assert reason_only(message).startswith(reason) and "SECRET" not in reason_only(message)
