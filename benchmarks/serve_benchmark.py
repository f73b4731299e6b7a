"""Load test of `cxr serve` on loopback, against the in-process ceiling on the same batches.

    python benchmarks/serve_benchmark.py [--arch cnn4_bn] [--image-size 224] [--clients 4]
        [--batch 32] [--requests 60] [--seconds 300] --images real-dev

Builds the architecture with params.yaml's settings (untrained, weights none: speed does not
depend on the weights), logs it as the served pyfunc (`cxr.pyfunc_classifier`, signature and
all) into a throw-away MLflow store, and starts `cxr serve` on it. Requests carry real
radiograph files (base64 PNG, `--batch` per request). Bounded by --requests per client and
--seconds in all:
1. ceiling: the same batches in this process, the Keras model's `predict_on_batch` on the
   decoded images, and the whole pyfunc (decode, resize, predict);
2. load: --clients concurrent clients: images/s, p50/p99 latency, errors (must be 0),
   the server's peak memory (VmHWM) against its idle memory;
3. the same load with a burst of bad requests mixed in (every third request: not an image,
   over the body cap, bad JSON, too many images): each must get a 400, the good ones a 200.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from cxr import machine

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(url: str, body: bytes) -> tuple[int, float]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    except OSError:
        status = 0  # refused or reset
    return status, time.perf_counter() - start


def load(url, bodies, clients, per_client, deadline) -> dict:
    """`clients` threads, each posting its share of `bodies` [(bytes, n images, expected
    status)] in turn; the figures of the good requests and the outcome of every one."""
    results: list[tuple[int, int, int, float]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_client):
            if time.time() > deadline:
                return
            body, n, expected = bodies[(k * per_client + i) % len(bodies)]
            status, seconds = post(url, body)
            with lock:
                results.append((status, expected, n, seconds))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    good = [r for r in results if r[1] == 200]
    latencies = np.array([r[3] for r in good])
    return {
        "requests": len(results),
        "images_per_s": sum(r[2] for r in good if r[0] == 200) / wall,
        "p50_s": float(np.percentile(latencies, 50)) if len(good) else float("nan"),
        "p99_s": float(np.percentile(latencies, 99)) if len(good) else float("nan"),
        "errors": sum(r[0] != r[1] for r in results),
        "mismatches": sorted({(r[1], r[0]) for r in results if r[0] != r[1]}),
        "bad_refused": sum(r[0] == 400 for r in results if r[1] == 400),
        "bad_sent": sum(r[1] == 400 for r in results),
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cnn4_bn")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=15, help="per client")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument(
        "--images", type=Path, required=True, help="real films (benchmarks/real_subset.py)"
    )
    parser.add_argument("--max-body-mb", type=float, default=8)
    args = parser.parse_args()

    import mlflow
    import pandas as pd

    from cxr.params import load_params
    from cxr.pyfunc_classifier import log_classifier

    params = load_params(ROOT / "params.yaml")
    classes = params["data"]["classes"]
    files = sorted(args.images.rglob("*.png"))
    if len(files) < args.batch:
        raise SystemExit(f"{args.images} holds {len(files)} PNG files; need {args.batch}")
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in files[: args.batch * 8]]
    batches = [encoded[i : i + args.batch] for i in range(0, len(encoded), args.batch)]
    frames = [pd.DataFrame({"image": b}) for b in batches]

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = untrained_model(args.arch, args.image_size, params)
    model.save(work / "model.keras")
    store = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    with mlflow.start_run():
        uri = log_classifier(work / "model.keras", classes, []).model_uri

    keras_rate, pyfunc_rate = in_process_rates(work / "model.keras", uri, batches, frames, args)
    plain, mixed, memory = under_load(work, store, uri, batches, encoded, args)
    print(
        f"\n{args.arch} at {args.image_size} px, batch {args.batch}, {args.clients} clients"
        f"\n# {machine.header()}\n"
    )
    print("| | images/s | vs keras | p50 | p99 | requests | errors | server peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| in-process keras predict_on_batch | {keras_rate:.0f} | 1.00 | | | | | |")
    print(
        f"| in-process pyfunc (decode+predict) | {pyfunc_rate:.0f} | "
        f"{pyfunc_rate / keras_rate:.2f} | | | | | |"
    )
    idle, loaded, peak = memory
    for name, r, mb in (("cxr serve", plain, loaded), ("cxr serve, bad mixed in", mixed, peak)):
        print(
            f"| {name} | {r['images_per_s']:.0f} | {r['images_per_s'] / keras_rate:.2f} | "
            f"{r['p50_s'] * 1000:.0f} ms | {r['p99_s'] * 1000:.0f} ms | {r['requests']} | "
            f"{r['errors']} | {mb:.0f} (idle {idle:.0f}) |"
        )
    print(f"\nbad requests refused with 400: {mixed['bad_refused']} of {mixed['bad_sent']}")
    for r in (plain, mixed):
        if r["mismatches"]:
            print("expected -> got (0: no answer):", r["mismatches"])
    return 1 if plain["errors"] or mixed["errors"] else 0


def untrained_model(arch: str, image_size: int, params: dict):
    """`arch` as params.yaml builds it, with random weights (serving speed needs no training)."""
    from cxr.fit import settings_for
    from cxr.models import build_model

    settings = settings_for(arch, params)[1]  # the builder's, train's lung focus included
    if "weights" in settings:
        settings["weights"] = "none"
    classes = params["data"]["classes"]
    return build_model(arch, (image_size, image_size, 1), len(classes), **settings)


def in_process_rates(keras_file: Path, uri: str, batches, frames, args) -> tuple[float, float]:
    """1. The ceiling, in this process, on the same batches: images/s of Keras'
    predict_on_batch on decoded images, and of the pyfunc (decoding included)."""
    import keras
    import mlflow

    from cxr.images import load_grey

    decoded = [
        np.stack([load_grey(base64.b64decode(e), args.image_size) for e in b])[..., None]
        for b in batches
    ]
    model = keras.saving.load_model(keras_file)
    model.predict_on_batch(decoded[0])
    start = time.perf_counter()
    for x in decoded:
        model.predict_on_batch(x)
    keras_rate = sum(len(x) for x in decoded) / (time.perf_counter() - start)
    pyfunc = mlflow.pyfunc.load_model(uri)
    pyfunc.predict(frames[0])
    start = time.perf_counter()
    for frame in frames:
        pyfunc.predict(frame)
    return keras_rate, sum(len(f) for f in frames) / (time.perf_counter() - start)


def under_load(work: Path, store: str, uri: str, batches, encoded, args):
    """2. and 3. `cxr serve` under `args.clients` clients, with good requests only, then with
    bad ones mixed in: (plain, mixed, the server's memory in MB idle / loaded / at peak)."""
    from cxr.pyfunc_classifier import MAX_IMAGES

    good = [
        (json.dumps({"dataframe_records": [{"image": e} for e in b]}).encode(), len(b), 200)
        for b in batches
    ]
    too_many = {"dataframe_records": [{"image": encoded[0]}] * (MAX_IMAGES + 1)}
    bad = [
        (json.dumps({"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]}).encode(), 1, 400),
        (b'{"dataframe_records": [' + b"0," * int(args.max_body_mb * 2**19 + 1), 1, 400),
        (b'{"dataframe_records": [{"image": ', 1, 400),
        (json.dumps(too_many).encode(), 1, 400),
    ]
    mixed_bodies = [
        x for pair in zip(good, good[1:] + good[:1], bad * 2, strict=False) for x in pair
    ]
    port = free_port()
    log = open(work / "serve.log", "w")  # noqa: SIM115 - the server's, closed at the end
    server = subprocess.Popen(
        [str(BIN / "cxr"), "serve", "--model", uri, "--port", str(port),
         "--max-body-mb", str(args.max_body_mb)],
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit((work / "serve.log").read_text()) from None
                time.sleep(0.5)
        post(f"{url}/invocations", good[0][0])  # warm-up: the first predict traces
        idle = peak_rss_mb(server.pid)
        deadline = time.time() + args.seconds
        plain = load(f"{url}/invocations", good, args.clients, args.requests, deadline)
        loaded = peak_rss_mb(server.pid)
        mixed = load(f"{url}/invocations", mixed_bodies, args.clients, args.requests, deadline)
        peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return plain, mixed, (idle, loaded, peak)


if __name__ == "__main__":
    sys.exit(main())
