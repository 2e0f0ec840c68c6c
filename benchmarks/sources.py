"""Indexing throughput by source: a local folder vs WebDataset shards vs an S3-compatible server,
the same files in the same run; then the re-index cost of an unchanged bucket.

The S3 server is moto's standalone server on 127.0.0.1 (a real HTTP server in its own process,
not a mock of the client), so "S3" here measures the client path (listing, ranged GETs,
retries machinery, ETag comparison) plus a local Python server, not a network or a real object
store. The model is a tiny DINOv2 config so the numbers compare reading + decoding, which is
what differs between sources; embedding costs the same for every source.

Usage: nice python -m benchmarks.sources [--quick] [--images N] [--objects M] [--workers W] [--bucket-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import save_result


def _make_images(root: Path, n: int) -> list[Path]:
    from tests.images import photo, write

    paths = []
    for i in range(n):
        paths.append(write(root / f"d{i // 500:03d}" / f"{i:06d}.jpg", photo(320, 240, seed=i), "JPEG", quality=88))
    return paths


def _make_shards(paths: list[Path], root: Path, corpus: Path, per_shard: int) -> None:
    import webdataset

    root.mkdir(parents=True)
    for s in range(0, len(paths), per_shard):
        with webdataset.TarWriter(str(root / f"{s // per_shard:06d}.tar")) as sink:
            for p in paths[s : s + per_shard]:
                key = p.relative_to(corpus).with_suffix("").as_posix().replace("/", "_")
                sink.write({"__key__": key, "jpg": p.read_bytes(), "json": b'{"caption": "x"}'})


def _upload(fs: Any, bucket: str, files: list[tuple[str, bytes]]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: fs.pipe(f"{bucket}/{kv[0]}", kv[1]), files))
    return time.perf_counter() - t


def _run(corpus: str, index_dir: Path, model: Path, workers: int, batch: int) -> dict[str, Any]:
    from retrieval.indexer.pipeline import IndexOptions, run_index
    from retrieval.settings import Settings

    settings = Settings(index_dir=index_dir, model=str(model), batch_size=batch, workers=workers, device="cpu")
    t = time.perf_counter()
    s = run_index(IndexOptions(corpus=corpus, settings=settings, progress=False))
    wall = time.perf_counter() - t
    assert s.failed == 0, s.failure_kinds
    return {"images": s.new + s.unchanged, "new": s.new, "wall_s": round(wall, 2),
            "images_per_s": round(s.new / wall, 1) if s.new else None,
            "timings": s.timings, "device": s.device}


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_reset() -> None:
    """Restart the kernel's peak-RSS counter of this process (VmHWM), so a phase's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_mb(field: str = "VmHWM") -> float | None:
    """VmHWM (peak since the last reset) or VmRSS (now) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _moto_server(port: int) -> Any:
    """moto's standalone S3 server as its own process: its CPU is not the client's, and it has its own GIL."""
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's server did not start")


def unchanged_bucket(m: int, model: Path, tmp: Path, workers: int, server_pid: int) -> dict[str, Any]:
    """Upload m tiny objects, index them once, then measure re-indexing the unchanged bucket."""
    import io

    import numpy as np
    import s3fs
    from PIL import Image

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    rng = np.random.default_rng(0)
    tiny = []
    for i in range(m):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        tiny.append((f"many/d{i // 1000:03d}/{i:06d}.png", buf.getvalue()))
    fs.mkdir("many")
    upload_s = _upload(fs, "many", tiny)
    del tiny
    first = _run("s3://many/many", tmp / "idx-many", model, workers, 256)
    server_cpu, cpu = _proc_cpu_s(server_pid), time.process_time()
    _peak_rss_reset()
    rss_before = _rss_mb("VmRSS")  # the process as the first run left it (torch, the model, caches)
    again = _run("s3://many/many", tmp / "idx-many", model, workers, 256)
    again["client_cpu_s"] = round(time.process_time() - cpu, 2)
    again["server_cpu_s"] = round(_proc_cpu_s(server_pid) - server_cpu, 2)
    again["client_rss_before_mb"] = rss_before
    again["client_peak_rss_mb"] = _rss_mb()
    assert again["new"] == 0 and again["device"] == "-"
    return {"objects": m, "upload_s": round(upload_s, 1), "first_run": first, "unchanged_rerun": again}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 images and 2,000 objects")
    parser.add_argument("--images", type=int, default=None, help="images per source [default 2,000]")
    parser.add_argument("--objects", type=int, default=None, help="objects in the unchanged bucket [default 100,000]")
    parser.add_argument("--bucket-only", action="store_true",
                        help="only the unchanged bucket (written as sources_bucket.json)")
    parser.add_argument("--workers", type=int, default=0, help="decode workers [default 0: the main process]")
    parser.add_argument("--per-shard", type=int, default=100)
    args = parser.parse_args()
    n = args.images or (400 if args.quick else 2_000)
    m = args.objects or (2_000 if args.quick else 100_000)

    import s3fs

    from tests.conftest import save_tiny_dinov2
    from tests.servers import S3_ENV, free_port

    tmp = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    port = free_port()
    server = _moto_server(port)
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        model = save_tiny_dinov2(tmp / "tiny-dinov2")
        if args.bucket_only:
            bucket = unchanged_bucket(m, model, tmp, args.workers, server.pid)
            path = save_result("sources_bucket", {"model": "tiny DINOv2 (hidden 32, 1 layer)", "workers": args.workers,
                                                   "unchanged_bucket": bucket})
            again = bucket["unchanged_rerun"]
            print(f"unchanged bucket of {m} objects: re-index {again['wall_s']} s, client CPU {again['client_cpu_s']} s, "
                  f"server CPU {again['server_cpu_s']} s, peak RSS {again['client_peak_rss_mb']} MB -> {path}")
            return
        corpus = tmp / "corpus"
        paths = _make_images(corpus, n)
        _make_shards(paths, tmp / "shards", corpus, args.per_shard)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        upload_s = _upload(fs, "bench", [(f"photos/{p.relative_to(corpus).as_posix()}", p.read_bytes()) for p in paths])
        _upload(fs, "bench", [(f"shards/{p.name}", p.read_bytes()) for p in sorted((tmp / "shards").glob("*.tar"))])
        rows = {}
        for name, spec in [("local folder", str(corpus)),
                           ("WebDataset shards (local)", str(tmp / "shards" / "*.tar")),
                           ("S3 objects (moto, loopback)", "s3://bench/photos"),
                           ("WebDataset shards on S3 (moto)", "s3://bench/shards/*.tar")]:
            rows[name] = _run(spec, tmp / f"idx-{len(rows)}", model, args.workers, 64)
            print(f"{name:32s} {rows[name]['images_per_s']} img/s ({rows[name]['wall_s']} s)")
        bucket = unchanged_bucket(m, model, tmp, args.workers, server.pid)
        result = {
            "images": n, "image_size": "320x240 JPEG q88", "per_shard": args.per_shard, "workers": args.workers,
            "model": "tiny DINOv2 (hidden 32, 1 layer): reading + decoding dominate", "upload_s": round(upload_s, 1),
            "sources": rows, "unchanged_bucket": bucket,
        }
        path = save_result("sources" + ("_quick" if args.quick else ""), result)
        again = bucket["unchanged_rerun"]
        print(f"unchanged bucket of {m} objects: re-index {again['wall_s']} s "
              f"(listing {again['timings'].get('scan_s')} s, plan {again['timings'].get('plan_s')} s) -> {path}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
