"""Before/after figures of issue 18, items 5-7, against a real ``raml serve`` process (not a test: a measurement).

Usage::

    PYTHONPATH=src python tests/deploy/hostile_figures.py --before-src /path/to/old/src --after-src src [--json F]

Builds a tiny index and student once (synthetic data, a random 16-d ResNet-18 at 32/48 px), then for each source
tree starts ``python -m raml serve`` on 127.0.0.1 (a free port) and measures, from ``/proc/<pid>/status``, the
server's resident memory (peak: VmHWM after a reset through ``/proc/<pid>/clear_refs``) and the wall time of:

- item 5: one 100000x1 PNG (370 bytes) at query size 32;
- item 6: one 16-bit 6300x6300 PNG; four (and sixteen) concurrent 16-bit 4000x4000 PNGs with ``--queue-size 1
  --max-batch 1``;
- item 7: three sockets trickling a body and one never finishing its headers: still open after 5 s? and the
  latency of a lone query while an upload is stalled, with ``--max-wait-ms 2000``.

Flags only the new tree knows (``--header-timeout 2 --body-timeout 2``) are passed to it alone. The machine may be
shared: report ``uptime`` with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MB = 2**20


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_world(work: Path) -> dict:
    import torch

    from raml.data import get_split
    from raml.data.synth import generate_synthetic_dataset
    from raml.deploy import index_images
    from raml.models import build_network, checkpoint_sha256, load_network, save_checkpoint

    generate_synthetic_dataset(work / "data" / "synth", num_classes=8, images_per_class=5, image_size=40)
    nets = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        nets[name] = work / f"{name}.pth"
        save_checkpoint(nets[name], build_network("resnet18", whitening=16, pretrained=False))
    paths = [str(p) for p in get_split("synth-test", work / "data").abspaths()]
    index_images(load_network(nets["teacher"]), paths, 48, work / "index", checkpoint_sha256(nets["teacher"]))
    return {"index": work / "index", "student": nets["student"], "query": Path(paths[1]).read_bytes()}


class Server:
    def __init__(self, src: str, world: dict, extra: list[str]) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "raml", "serve", "--index", str(world["index"]), "--network-path"]
        argv += [str(world["student"]), "--image-size", "32", "--device", "cpu", "--port", str(self.port), *extra]
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        self.query = world["query"]

    def rss_mb(self) -> float:
        return _kb(self.process.pid, "VmRSS") / 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        return _kb(self.process.pid, "VmHWM") / 1024

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _post(url: str, data: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/search", content=data, headers={"content-type": "image/png"}, timeout=timeout)


def one_upload(server: Server, data: bytes) -> dict:
    server.reset_peak()
    idle = server.rss_mb()
    started = time.perf_counter()
    status = _post(server.url, data).status_code
    return {"status": status, "seconds": time.perf_counter() - started, "peak_growth_mb": server.peak_mb() - idle}


def concurrent_uploads(server: Server, data: bytes, count: int) -> dict:
    server.reset_peak()
    idle = server.rss_mb()
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: _post(server.url, data), range(count)))
    good = httpx.post(server.url + "/search", content=server.query, headers={"content-type": "image/jpeg"}).status_code
    return {
        "statuses": statuses,
        "seconds": time.perf_counter() - started,
        "idle_mb": idle,
        "peak_growth_mb": server.peak_mb() - idle,
        "then_a_good_request": good,
    }


def slow_clients(server: Server, wait_s: float = 5.0) -> dict:
    sockets = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(
            b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        )
        sockets.append(sock)
    headers = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    headers.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    deadline = time.monotonic() + wait_s
    closed = [False] * 3
    while time.monotonic() < deadline:
        for i, sock in enumerate(sockets):
            if not closed[i]:
                try:
                    sock.sendall(b"x")
                except OSError:
                    closed[i] = True
        time.sleep(0.1)
    headers.settimeout(0.5)
    try:
        header_closed = headers.recv(65536) is not None  # any answer (408) or EOF
    except TimeoutError:
        header_closed = False
    except OSError:
        header_closed = True
    for sock in [*sockets, headers]:
        sock.close()
    return {"after_s": wait_s, "trickling_still_open": 3 - sum(closed), "partial_headers_closed": header_closed}


def stalled_upload_latency(server: Server) -> dict:
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    stalled.sendall(
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 900\r\n\r\nab"
    )
    time.sleep(0.3)
    started = time.perf_counter()
    response = httpx.post(server.url + "/search", content=server.query, headers={"content-type": "image/jpeg"})
    seconds = time.perf_counter() - started
    stalled.close()
    return {"status": response.status_code, "lone_query_seconds": seconds}


def measure(src: str, world: dict, new_flags: bool) -> dict:
    out: dict = {"src": src}
    thin = _png(np.zeros((1, 100_000), dtype=np.uint8))
    deep = _png(np.tile(np.linspace(0, 65535, 6300).astype(np.uint16), (6300, 1)))
    deep4k = _png(np.tile(np.linspace(0, 65535, 4000).astype(np.uint16), (4000, 1)))
    out["sizes_bytes"] = {"thin": len(thin), "deep_6300": len(deep), "deep_4000": len(deep4k)}
    server = Server(src, world, [])
    try:
        out["item5_thin_100000x1"] = one_upload(server, thin)
        out["item6_16bit_6300"] = one_upload(server, deep)
    finally:
        server.close()
    server = Server(src, world, ["--queue-size", "1", "--max-batch", "1"])
    try:
        out["item6_4_concurrent_4000"] = concurrent_uploads(server, deep4k, 4)
        if new_flags:
            out["item6_16_concurrent_4000"] = concurrent_uploads(server, deep4k, 16)
    finally:
        server.close()
    deadlines = ["--header-timeout", "2", "--body-timeout", "2"] if new_flags else []
    server = Server(src, world, ["--max-wait-ms", "2000", *deadlines])
    try:
        out["item7_slow_clients"] = slow_clients(server)
        out["item7_lone_query_with_stalled_upload"] = stalled_upload_latency(server)
    finally:
        server.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-src", required=True)
    parser.add_argument("--after-src", required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raml-hostile-") as work:
        world = build_world(Path(work))
        results = {
            "before": measure(str(Path(args.before_src).resolve()), world, new_flags=False),
            "after": measure(str(Path(args.after_src).resolve()), world, new_flags=True),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
