"""Load on `racm3 serve`: concurrent clients on 127.0.0.1 for a fixed time, mostly searches, some generations.

Starts `racm3 serve` (the shipped model and emoji memory unless --model/--memory) on a free loopback port, runs
--clients clients for --seconds (each client a loop: most send POST /v1/retrieve or POST /knn-service, --generators
of them POST /v1/generate/image), stops by itself, and prints requests/s, p50/p99 latency per endpoint, errors and the
server's RSS before (after warm-up) and after; writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py                       # 32 clients, 60 s
    python benchmarks/serve_load.py --clients 8 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serving_browser import start_serve  # noqa: E402

CAPTIONS = ["flag: France", "pizza", "grinning face", "red apple", "cat face", "rocket", "snowman", "thumbs up",
            "flag: Japan", "sun", "umbrella with rain drops", "birthday cake", "dog", "house", "guitar", "tiger"]
MAX_REQUESTS = 200_000  # a bound on the whole run, whatever the speed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def client_loop(url: str, kind: str, stop: float, seed: int, out: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=130) as http:
        while time.monotonic() < stop:
            caption = rng.choice(CAPTIONS)
            if kind == "generate":
                endpoint, path = "/v1/generate/image", "/v1/generate/image"
                body = {"caption": caption, "k": 2, "samples": 2, "seed": rng.randrange(1000)}
            elif rng.random() < 0.5:
                endpoint, path, body = "/v1/retrieve", "/v1/retrieve", {"text": caption, "k": 4}
            else:
                endpoint, path = "/knn-service", "/knn-service"
                body = {"text": caption, "modality": "image", "num_images": 10, "indice_name": None}
            t0 = time.perf_counter()
            try:
                r = http.post(path, json=body)
                status = r.status_code
                if status == 200:
                    r.json()
            except httpx.HTTPError:
                status = -1
            dt = time.perf_counter() - t0
            with lock:
                rec = out.setdefault(endpoint, {"latencies": [], "errors": 0, "rejected_503": 0})
                if status == 200:
                    rec["latencies"].append(dt)
                elif status == 503:
                    rec["rejected_503"] += 1
                else:
                    rec["errors"] += 1
                out["_total"] = out.get("_total", 0) + 1
                if out["_total"] >= MAX_REQUESTS:
                    return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--generators", type=int, default=3, help="clients of the --clients that generate images")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--memory", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 0 <= args.generators <= args.clients or not 1 <= args.seconds <= 600:
        ap.error("--clients 1-256, --generators 0-clients, --seconds 1-600")
    serve_args = [*(["--model", args.model] if args.model else []), *(["--memory", args.memory] if args.memory else [])]
    proc, url = start_serve(serve_args)  # always 127.0.0.1
    assert url.startswith("http://127.0.0.1:")
    try:
        with httpx.Client(base_url=url, timeout=130) as http:  # warm-up: the first of each kind
            http.post("/v1/retrieve", json={"text": "pizza"}).raise_for_status()
            http.post("/knn-service", json={"text": "pizza"}).raise_for_status()
            http.post("/v1/generate/image", json={"caption": "pizza", "samples": 2}).raise_for_status()
        rss_before = rss_kib(proc.pid)
        out: dict = {}
        lock = threading.Lock()
        t0 = time.monotonic()
        stop = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(url, "generate" if i < args.generators else "search",
                                                               stop, i, out, lock), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 140)
        elapsed = time.monotonic() - t0
        rss_after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    rows = []
    for endpoint in ("/v1/retrieve", "/knn-service", "/v1/generate/image"):
        rec = out.get(endpoint, {"latencies": [], "errors": 0, "rejected_503": 0})
        lat = rec["latencies"]
        rows.append({"endpoint": endpoint, "ok": len(lat), "requests_per_s": round(len(lat) / elapsed, 1),
                     "p50_ms": round(1000 * percentile(lat, 0.5), 1), "p99_ms": round(1000 * percentile(lat, 0.99), 1),
                     "errors": rec["errors"], "rejected_503": rec["rejected_503"]})
    result = {"clients": args.clients, "generators": args.generators, "seconds": round(elapsed, 1),
              "threads": os.cpu_count(), "endpoints": rows,
              "errors": sum(r["errors"] for r in rows), "server_rss_mib_before": round(rss_before / 1024, 1),
              "server_rss_mib_after": round(rss_after / 1024, 1),
              "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])}
    print(f"{args.clients} clients ({args.generators} generating) for {elapsed:.1f} s on 127.0.0.1")
    print(f"{'endpoint':<22}{'ok':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'503':>6}")
    for r in rows:
        print(f"{r['endpoint']:<22}{r['ok']:>8}{r['requests_per_s']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}"
              f"{r['errors']:>8}{r['rejected_503']:>6}")
    print(f"server RSS {result['server_rss_mib_before']} MiB before, {result['server_rss_mib_after']} MiB after")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
