"""The guard in front of MLflow's scoring app (`cxr serve`): unit tests on a stand-in app;
the real server is tested end to end in test_champion.py. And `cxr serve`'s start: the
port taken before the model loads."""

import asyncio
import json
import socket
import subprocess

import pytest

from cxr import cli, http_server
from cxr.http_server import DRAIN_FACTOR, MAX_DEPTH, MAX_REASON, Guard, json_depth, reason_only
from tests.conftest import BIN


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


REQUEST = {"dataframe_records": [{"pixels": [[0, 1], [2, 3]]}, {"image": 'a[b{c\\"['}]}


def nesting(value) -> int:
    """The depth of a parsed JSON value, recursively: what json_depth must match."""
    if isinstance(value, dict):
        value = list(value.values())
    return 1 + max(map(nesting, value), default=0) if isinstance(value, list) else 0


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (json.dumps(REQUEST).encode(), 5),
        (b"", 0),
        (b'"[[[[{{{{"', 0),  # brackets in a string do not count
        (rb'["\"[[[", [1]]', 2),  # nor after an escaped quote
        (rb'["\\", [[1]]]', 3),  # an escaped backslash ends no string
        (rb'{"a": "\\\"[["}', 1),  # an escaped backslash, then an escaped quote
        (b"[" * 100_000, 100_000),  # never closed
        (b"[" + b"[], " * 50 + b"[[]]]", 3),
        (b'["' + b"[" * (1 << 20) + b'"]', 1),  # a string across the chunks counted at once
        (b"[" * ((1 << 20) + 7) + b"]" * ((1 << 20) + 7), (1 << 20) + 7),
    ],
)
def test_json_depth_counts_the_nesting_outside_strings(body, depth):
    assert json_depth(body) == depth
    if depth < 100:
        assert nesting(json.loads(body or b"0")) == depth  # the case is valid JSON


def test_a_body_nested_too_deeply_is_refused_before_the_app_parses_it():
    """100,000 `[` (200 kB) made MLflow's parser raise RecursionError (HTTP 500)."""
    app = Recorder()
    status, body, _ = call(Guard(app), [b"[" * 50_000, b"[" * 50_000])
    assert status == 400 and app.bodies == []
    message = json.loads(body)["message"]
    assert message.startswith(
        f"the request body nests arrays and objects 100,000 deep, over the limit of {MAX_DEPTH};"
        ' send {"dataframe_records": '
    )
    assert "\n" not in message
    too_deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    assert call(Guard(app), [too_deep])[0] == 400 and app.bodies == []


def test_a_request_nested_as_usual_reaches_the_app():
    app = Recorder()
    request = json.dumps(REQUEST).encode()
    at_the_cap = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    for body in (request, at_the_cap, b'{"image": "' + b"[" * 1000 + b'"}'):
        status, _, _ = call(Guard(app), [body[:10], body[10:]])
        assert status == 200 and app.bodies[-1] == body


@pytest.fixture
def busy_port():
    """A port another server listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def in_use(port: int) -> str:
    return (
        f"error: port {port} on 127.0.0.1 is in use (Address already in use): choose another "
        "with --port."
    )


def test_serve_on_a_busy_port_says_so_before_loading_the_model(busy_port, monkeypatch, capsys):
    """The port is taken first: a busy one is one line, not a failure after the model has
    loaded (28 s) and "serving ... on ..." was printed."""
    work = []
    monkeypatch.setattr(cli, "_model_uri", lambda args: work.append("uri") or "runs:/0/m")
    monkeypatch.setattr(http_server, "app_for", lambda *args: work.append("load"))
    monkeypatch.setattr(http_server, "run", lambda *args: work.append("run"))
    assert cli.main(["serve", "--port", str(busy_port)]) == 2
    out, err = capsys.readouterr()
    assert work == [] and out == ""
    assert err == in_use(busy_port) + "\n"


def test_cxr_serve_on_a_busy_port_is_one_line_with_a_bogus_model(busy_port, tmp_path):
    command = [str(BIN / "cxr"), "serve", "--model", "runs:/no-such-run/m", "-p", str(busy_port)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [in_use(busy_port)]


def test_serve_hands_its_socket_and_caps_to_the_server(monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(cli, "_model_uri", lambda args: "runs:/0/m")
    monkeypatch.setattr(http_server, "app_for", lambda *args: calls.update(app_for=args))
    monkeypatch.setattr(http_server, "run", lambda app, sock: calls.update(run=sock.getsockname()))
    argv = ["serve", "--port", "0", "--max-body-mb", "2", "--max-megapixels", "1.5"]
    assert cli.main(argv) == 0
    assert calls["app_for"] == ("runs:/0/m", 2 << 20, 1_500_000)
    host, port = calls["run"]
    assert host == "127.0.0.1" and port > 0
    assert capsys.readouterr().out == f"serving runs:/0/m on http://127.0.0.1:{port}/invocations\n"
    assert cli.main(["serve", "--port", "0"]) == 0
    assert calls["app_for"][2] is None  # the model's own cap: pyfunc_classifier.MAX_REQUEST_PIXELS


def test_a_host_that_cannot_be_had_is_one_line():
    with pytest.raises(cli.CxrError, match=r"cannot listen on 192\.0\.2\.1 port 5001 \(.*--host"):
        http_server.listen("192.0.2.1", 5001)  # TEST-NET-1: on no interface of this machine
