"""Web UI latency: `/generate` over loopback with 1 client, then with many concurrent gradio_client clients.

    python bench/ui_latency.py                       # uses cvae.ckpt
    python bench/ui_latency.py --clients 20 --calls 25

Starts gradio_test.py's app in this process on a free 127.0.0.1 port, then times complete client calls (request,
queue, decode, PNG encoding, and the client's download of the image).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def client_loop(url: str, calls: int, seed: int, latencies: list[float], errors: list[str],
                start_barrier: threading.Barrier) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    start_barrier.wait()
    for i in range(calls):
        digit, z0, z1 = (seed + i) % 10, ((seed * 7 + i) % 13 - 6) / 2, ((seed * 3 + i) % 11 - 5) / 2
        t = time.perf_counter()
        try:
            client.predict(digit, z0, z1, api_name="/generate")
            latencies.append(time.perf_counter() - t)
        except Exception as err:  # count every failure, whatever its type
            errors.append(f"{type(err).__name__}: {err}")


def measure(url: str, clients: int, calls: int) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client_loop, args=(url, calls, c, latencies, errors, barrier))
               for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()  # clients are connected; time only the calls
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"clients": clients, "calls": len(latencies) + len(errors), "errors": len(errors),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 99),
            "images_per_s": len(latencies) / elapsed, "first_error": errors[0] if errors else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path("cvae.ckpt"), help="checkpoint (default: cvae.ckpt)")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients in the second run (default: 20)")
    p.add_argument("--calls", type=int, default=25, help="calls per concurrent client (default: 25)")
    p.add_argument("--single-calls", type=int, default=200, help="calls of the single client (default: 200)")
    args = p.parse_args()

    import torch

    from common import CheckpointError, fail, load_cvae
    from gradio_test import build_app, launch

    torch.set_num_threads(1)  # as gradio_test.main() does: one small decode per request

    try:
        model = load_cvae(args.ckpt)
    except CheckpointError as err:
        fail(str(err))
    app = build_app(model)
    url = launch(app, "127.0.0.1", free_port(), block=False)
    try:
        measure(url, 1, 20)  # warm-up: first requests pay for lazy imports and caches
        rows = [measure(url, 1, args.single_calls), measure(url, args.clients, args.calls)]
    finally:
        app.close()
    print(f"\n/generate over loopback, {os.cpu_count()} cores\n")
    print("| clients | calls | errors | p50 (ms) | p99 (ms) | images/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['calls']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['images_per_s']:.1f} |")
    for r in rows:
        if r["errors"]:
            print(f"first error with {r['clients']} clients: {r['first_error']}")


if __name__ == "__main__":
    main()
