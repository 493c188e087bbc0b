"""Web UI latency: `/generate` over loopback with 1 client, then with many concurrent gradio_client clients.

    python bench/ui_latency.py                       # uses cvae.ckpt
    python bench/ui_latency.py --clients 20 --calls 25 --repeats 3

Starts `python gradio_test.py` as its own process on a free 127.0.0.1 port, as a user would, and times complete
gradio_client calls from this process: request, queue, decode, PNG encoding, and the client's download of the image.
Each row is measured twice, once with a default `Client(url)` and once with a Client that shares one SSL context
(`ssl_verify=`): gradio_client opens a fresh httpx connection for each of its requests, and each one builds an SSL
context from certifi's CA bundle (about 50 ms on a 2-core machine), even for a plain-http URL that never uses it.
The server's and the clients' CPU time per call come from /proc, so it shows which side the time goes to.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_loop(url: str, calls: int, seed: int, client_kwargs: dict, latencies: list[float], errors: list[str],
                start_barrier: threading.Barrier) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False, **client_kwargs)
    try:
        start_barrier.wait()
        for i in range(calls):
            digit, z0, z1 = (seed + i) % 10, ((seed * 7 + i) % 13 - 6) / 2, ((seed * 3 + i) % 11 - 5) / 2
            t = time.perf_counter()
            try:
                client.predict(digit, z0, z1, api_name="/generate")
                latencies.append(time.perf_counter() - t)
            except Exception as err:  # count every failure, whatever its type
                errors.append(f"{type(err).__name__}: {err}")
    finally:
        client.close()  # stops its heartbeat and event stream, which would load later rounds


def measure(url: str, server_pid: int, clients: int, calls: int, client_kwargs: dict) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client_loop, args=(url, calls, c, client_kwargs, latencies, errors, barrier))
               for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()  # clients are connected; time only the calls
    server_cpu, own_cpu = cpu_seconds(server_pid), cpu_seconds(os.getpid())
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    n = len(latencies) + len(errors)
    return {"clients": clients, "calls": n, "errors": len(errors),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 99),
            "images_per_s": len(latencies) / elapsed,
            "server_cpu_ms": 1000 * (cpu_seconds(server_pid) - server_cpu) / n,
            "client_cpu_ms": 1000 * (cpu_seconds(os.getpid()) - own_cpu) / n,
            "first_error": errors[0] if errors else ""}


def start_server(ckpt: Path, port: int, log: IO[str]) -> subprocess.Popen:
    """`python gradio_test.py` on 127.0.0.1:port, its output going to `log`; returns once it answers."""
    import httpx

    # A file, not a pipe: nobody reads the server's output while it serves, and a full pipe would stall it.
    server = subprocess.Popen([sys.executable, "gradio_test.py", "--ckpt", str(ckpt), "--port", str(port)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit(f"gradio_test.py exited with code {server.returncode}:\n{log.read()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).raise_for_status()
            return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("gradio_test.py did not answer within 120 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path("cvae.ckpt"), help="checkpoint (default: cvae.ckpt)")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients in the second run (default: 20)")
    p.add_argument("--calls", type=int, default=25, help="calls per concurrent client (default: 25)")
    p.add_argument("--single-calls", type=int, default=100, help="calls of the single client (default: 100)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every measurement; the table shows the "
                   "median round by images/s (default: 3)")
    args = p.parse_args()
    ckpt = args.ckpt.resolve()
    if not ckpt.is_file():
        raise SystemExit(f"no checkpoint at {ckpt}; train one with `python train.py`")

    import httpx

    shared_ssl = httpx.create_ssl_context()  # verification stays on; the context is just built once
    client_modes = {"default Client(url)": {}, "Client(url, ssl_verify=shared context)": {"ssl_verify": shared_ssl}}
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    server = start_server(ckpt, port, log)
    url = f"http://127.0.0.1:{port}/"
    rows = []
    try:
        measure(url, server.pid, 1, 10, {})  # warm-up: first requests pay for lazy imports and caches
        for mode, kwargs in client_modes.items():
            for clients, calls in ((1, args.single_calls), (args.clients, args.calls)):
                rounds = sorted((measure(url, server.pid, clients, calls, kwargs) for _ in range(args.repeats)),
                                key=lambda r: r["images_per_s"])
                rows.append((mode, rounds[len(rounds) // 2], rounds))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    print(f"\n/generate over loopback, {os.cpu_count()} cores, median of {args.repeats} rounds by images/s\n")
    print("| client | clients | calls | errors (all rounds) | p50 (ms) | p99 (ms) | images/s (all rounds) "
          "| server CPU ms/call | client CPU ms/call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r, rounds in rows:
        spread = ", ".join(f"{x['images_per_s']:.1f}" for x in rounds)
        print(f"| {mode} | {r['clients']} | {r['calls']} | {sum(x['errors'] for x in rounds)} | {r['p50_ms']:.1f} "
              f"| {r['p99_ms']:.1f} | {r['images_per_s']:.1f} ({spread}) | {r['server_cpu_ms']:.1f} "
              f"| {r['client_cpu_ms']:.1f} |")
    for mode, _, rounds in rows:
        for r in rounds:
            if r["errors"]:
                print(f"first error ({mode}, {r['clients']} clients): {r['first_error']}")
                break


if __name__ == "__main__":
    main()
