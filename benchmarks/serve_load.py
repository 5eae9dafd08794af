"""Load test of `fusionseg serve`, loopback only and bounded: N requests from C concurrent clients.

Starts its own server (a subprocess of `fusionseg serve` on 127.0.0.1, a free port) unless --url is given,
warms it up, then sends --requests POST /v1/segment from --clients threads (http.client, keep-alive, no extra
packages). Prints p50/p95 latency, throughput, the count of every status (503 = refused by the bounded queue,
the only acceptable error), and the server's resident memory (VmRSS from /proc) after the model loaded, after
warm-up and after the run, so growth across requests is visible.

Usage: python benchmarks/serve_load.py [--requests 200] [--clients 16] [--workers 2] [--threads 1]
                                       [--queue 16] [--image examples/cat_toilet.jpg] [--classes "cat, toilet, sink"]
                                       [--rounds 1] [--url http://127.0.0.1:8000 [--pid PID]]
Exit code 1 if any request ended in something other than 200 or 503.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int | None) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of ``pid`` in MiB, or None when it cannot be read."""
    if pid is None:
        return None
    try:
        vals = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    vals[k] = int(v.split()[0]) / 1024
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError, ValueError):
        return None


def multipart(image: bytes, filename: str, classes: str) -> tuple[bytes, str]:
    b = "fusionsegLoadTest7f3a"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="classes"\r\n\r\n{classes}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "fusionseg.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--model", a.model,
           "--workers", str(a.workers), "--queue", str(a.queue), "--threads", str(a.threads), "--no-access-log"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    for line in p.stdout:  # "fusionseg serve: model ... on http://127.0.0.1:PORT  (page ..."
        if " on http://" in line:
            url = line.split(" on ", 1)[1].split()[0]
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # drain the log
            return p, url
        if time.time() - t0 > 120:
            break
    p.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


class Client:
    def __init__(self, url: str, timeout: float):
        u = urlsplit(url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1") and not (u.hostname or "").startswith("127."):
            raise SystemExit(f"loopback only: {url} is not on this machine")
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one reconnect if the kept-alive connection was closed by the server
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def run_round(url: str, body: bytes, ctype: str, n: int, clients: int, timeout: float, deadline: float):
    lat: list[float] = []
    status: Counter = Counter()
    lock = threading.Lock()
    next_i = [0]

    def worker() -> None:
        c = Client(url, timeout)
        while time.time() < deadline:
            with lock:
                if next_i[0] >= n:
                    return
                next_i[0] += 1
            t0 = time.perf_counter()
            try:
                code, _ = c.request("POST", "/v1/segment", body, ctype)
            except Exception as e:  # noqa: BLE001 - counted, never raised
                code = f"conn-error ({type(e).__name__})"
            dt = time.perf_counter() - t0
            with lock:
                status[code] += 1
                if code == 200:
                    lat.append(dt)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(1.0, deadline - time.time() + timeout))
    return lat, status, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server on this machine (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for its memory")
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the run to see whether memory keeps growing")
    ap.add_argument("--workers", type=int, default=2, help="server worker threads (started server only)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (started server only)")
    ap.add_argument("--queue", type=int, default=16, help="server queue beyond the workers (started server only)")
    ap.add_argument("--image", default=str(REPO / "examples" / "cat_toilet.jpg"))
    ap.add_argument("--classes", default="cat, toilet, sink")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout, s")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    C.add_json_arg(ap, "serve_load")
    a = ap.parse_args()
    C.in_range(a.requests, "--requests", 1, 100_000)  # bad input: one line, exit 2 (README, Performance)
    C.in_range(a.clients, "--clients", 1, 256)
    C.in_range(a.rounds, "--rounds", 1, 20)
    image = Path(a.image).read_bytes()
    body, ctype = multipart(image, Path(a.image).name, a.classes)

    proc = None
    pid = a.pid
    if a.url:
        url = a.url.rstrip("/")
        how = "given"
    else:
        proc, url = start_server(a)
        pid = proc.pid
        how = (f"started here: fusionseg serve --workers {a.workers} --threads {a.threads} --queue {a.queue}, "
               f"model {a.model}")
    try:
        c = Client(url, a.timeout)
        t0 = time.time()
        while True:  # wait until it answers
            try:
                if c.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() - t0 > 60:
                raise SystemExit(f"{url}/healthz does not answer")
            time.sleep(0.2)
        info = json.loads(c.request("GET", "/v1/model")[1])
        mem_loaded = rss_mib(pid)
        for _ in range(5):  # warm-up: first calls allocate
            code, data = c.request("POST", "/v1/segment", body, ctype)
            if code != 200:
                raise SystemExit(f"warm-up request failed: HTTP {code}: {data[:300]!r}")
        one = json.loads(data)
        mem_warm = rss_mib(pid)
        print(f"server: {url} ({how}); {info['image_encoder'].get('name')} + {info['text_encoder'].get('name')}, "
              f"limits {info['limits']}")
        print(f"request: {Path(a.image).name} ({one['width']}x{one['height']}, {len(image):,} bytes), "
              f"classes {a.classes!r}; {a.requests} requests from {a.clients} concurrent clients per round; "
              f"machine: {os.cpu_count()} CPUs")
        deadline = time.time() + a.max_seconds
        all_status: Counter = Counter()
        mems, rows, notes = [], [], []
        for r in range(1, a.rounds + 1):
            lat, status, wall = run_round(url, body, ctype, a.requests, a.clients, a.timeout, deadline)
            all_status.update(status)
            done = sum(status.values())
            mems.append(rss_mib(pid))
            print(f"round {r}: {done} requests in {wall:.1f} s -> {done / wall:.2f} req/s "
                  f"({status.get(200, 0) / wall:.2f} ok/s); latency of 200s: p50 {pct(lat, 50):.2f} s, "
                  f"p95 {pct(lat, 95):.2f} s, max {max(lat) if lat else float('nan'):.2f} s; "
                  f"status {dict(sorted(status.items(), key=str))}")
            rows.append([r, done, f"{wall:.1f}", f"{done / wall:.2f}", f"{status.get(200, 0) / wall:.2f}",
                         f"{pct(lat, 50):.2f}", f"{pct(lat, 95):.2f}", f"{max(lat) if lat else float('nan'):.2f}",
                         ", ".join(f"{k}: {v}" for k, v in sorted(status.items(), key=str)),
                         f"{mems[-1][0]:.1f}" if mems[-1] else "unknown"])
        bad = {k: v for k, v in all_status.items() if k not in (200, 503)}
        notes.append(f"Errors other than 503: {sum(bad.values())} {bad if bad else ''}".rstrip() + ".")
        print(notes[-1])
        if mem_loaded:
            after = ", ".join(f"after round {i} {m[0]:.1f}" for i, m in enumerate(mems, 1) if m)
            notes.append(f"Server RSS (MiB): model loaded {mem_loaded[0]:.1f}, after warm-up {mem_warm[0]:.1f}, "
                         f"{after}; peak {mems[-1][1]:.1f}; growth over the run {mems[-1][0] - mem_warm[0]:+.1f}.")
        else:
            notes.append("Server RSS: unknown (pass --pid with --url to read /proc/PID/status).")
        print(notes[-1])
        header = ["round", "requests", "wall s", "req/s", "ok/s", "p50 s", "p95 s", "max s", "status",
                  "server RSS MiB after"]
        C.save_results(a.json, "serve_load",
                       f"server {how}; {Path(a.image).name} ({one['width']}x{one['height']}), classes {a.classes!r}; "
                       f"{a.requests} requests from {a.clients} concurrent clients per round, {a.rounds} rounds",
                       [{"header": header, "rows": rows}], notes)
        h = json.loads(c.request("GET", "/healthz")[1])
        print(f"healthz after: {h}")
        return 1 if bad else 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
