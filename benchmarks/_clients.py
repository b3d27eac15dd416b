"""Load-test clients in separate processes (standard library only, so they start fast).

Each client process sends its request bodies to `POST /generate` one after the other (closed
loop) and reports `(kind, start, end, status, tokens)` per request; all processes start
together on a barrier.

Example:
    >>> latencies([("4", 0.0, 0.5, 200, 4), ("4", 1.0, 1.25, 200, 4)], "4")
    [0.5, 0.25]
"""

from __future__ import annotations

import json
import multiprocessing
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["latencies", "run_clients"]


def _post(url: str, body: dict[str, Any]) -> tuple[int, int]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status, len(json.loads(resp.read())["tokens"])
    except urllib.error.HTTPError as err:
        return err.code, 0


def _client(url: str, bodies: list[tuple[str, dict[str, Any]]], out, ready, go) -> None:
    _post(url, {"tokens": [1], "max_new_tokens": 1})  # connection warm-up, untimed
    ready.set()
    go.wait()
    records = []
    for kind, body in bodies:
        start = time.time()
        status, n = _post(url, body)
        records.append((kind, start, time.time(), status, n))
    out.put(records)


def run_clients(url: str, shares: list[list[tuple[str, dict[str, Any]]]]) -> tuple[float, list]:
    """One process per share; returns `(wall seconds from go to last answer, records)`."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    readies = [ctx.Event() for _ in shares]
    procs = [
        ctx.Process(target=_client, args=(url, share, out, ready, go))
        for share, ready in zip(shares, readies, strict=True)
    ]
    for p in procs:
        p.start()
    for r in readies:
        r.wait(timeout=300)
    start = time.time()
    go.set()
    records = [rec for _ in procs for rec in out.get(timeout=3600)]
    for p in procs:
        p.join()
    return max(r[2] for r in records) - start, records


def latencies(records: list, kind: str) -> list[float]:
    """End-to-end seconds of the successful requests of `kind`."""
    return [end - start for k, start, end, status, _ in records if k == kind and status == 200]
