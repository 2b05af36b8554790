"""Video download through the gateway vs nginx serving the same file, and the gateway's memory while it streams.

One run, loopback only (needs ``nginx`` and ``curl``; ``apt-get install -y nginx-light curl``)::

    .venv/bin/python bench/content_bench.py [--mb 100] [--big-mb 500] [--rounds 3]

* ``nginx``: nginx serves a ``--mb`` file of random bytes (``sendfile on``); it is also the "upstream", so the
  task's ``video_url`` is on the upstream's origin (the account's key is sent, as with UniAll's own files).
* ``gateway (upstream)``: one ``kling-gateway serve`` process (auth open, SQLite ledger holding one completed task
  whose ``video_url`` is that file): ``curl`` downloads ``/v1/videos/{id}/content``, streamed from nginx.
* ``gateway (archive)``: the same after the archiver copied the video to a ``file://`` archive: served from disk.

MB/s is the best of ``--rounds`` curl downloads (``-o /dev/null``; MB = 10^6 bytes). The gateway's RSS is sampled
from ``/proc`` every 10 ms during one download of each size; the table shows it before, at its peak and the rise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import orjson
from common import Procs, child_env, free_port, http_get, nginx_argv, nginx_conf, wait_until

TASK = "task_bench_video"
NGINX_SERVER = """\
    sendfile on;
    tcp_nopush on;
    server {
        listen 127.0.0.1:@PORT@;
        root @ROOT@;
        location / { }
    }
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def curl_speed(url: str) -> tuple[float, int]:
    """(MB/s, bytes) of one download to /dev/null."""
    out = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]) / 1e6, int(out[1])


def best_speed(url: str, rounds: int, size: int) -> float:
    speeds = []
    for _ in range(rounds):
        speed, got = curl_speed(url)
        if got != size:
            raise RuntimeError(f"{url}: got {got} bytes, expected {size}")
        speeds.append(speed)
    return max(speeds)


def download_rss(url: str, pid: int, size: int) -> tuple[int, int, float]:
    """(RSS before KiB, peak KiB, MB/s) while one download runs."""
    before = rss_kib(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        speed, got = curl_speed(url)
    finally:
        done.set()
        sampler.join()
    if got != size:
        raise RuntimeError(f"{url}: got {got} bytes, expected {size}")
    return before, peak, speed


def write_file(path: Path, size: int) -> None:
    block = os.urandom(1024 * 1024)
    with path.open("wb") as handle:
        left = size
        while left > 0:
            handle.write(block[: min(left, len(block))])
            left -= len(block)


async def record_task(store_url: str, video_url: str, task_id: str) -> None:
    from gateway.store import open_store
    from gateway.store.base import TaskRecord

    store = await open_store(store_url)
    try:
        task = TaskRecord(
            task_id=task_id,
            key_name="open",
            model="kling-v3-std-silent",
            mode="text",
            tier="std",
            audio=False,
            duration=5,
            duration_defaulted=False,
            estimate_seconds=5,
            estimate_usd=Decimal("0.42"),
            price_per_second_usd=Decimal("0.084"),
            mode_multiplier=Decimal(1),
            request_id="bench",
            submitted_at=time.time(),
        )
        await store.resolve_intent(f"i-{task_id}", task)
        body = orjson.dumps({"id": task_id, "status": "completed", "progress": 100, "video_url": video_url})
        await store.settle(task_id, "completed", Decimal(5), Decimal("0.42"), body, time.time())
    finally:
        await store.close()


async def archived(store_url: str, task_id: str) -> bool:
    from gateway.store import open_store

    store = await open_store(store_url)
    try:
        record = await store.get_archive(task_id)
        return record is not None and record.state == "stored"
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=100, help="size of the video for the throughput runs (MiB)")
    parser.add_argument("--big-mb", type=int, default=500, help="a second, bigger video for RSS only (0: skip)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("nginx", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y nginx-light curl")
    tmp = Path(tempfile.mkdtemp(prefix="content-bench-"))
    procs = Procs(tmp)
    try:
        run(args, tmp, procs)
    except BaseException:
        print(f"failed; logs kept in {tmp}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        procs.stop_all()


def run(args: argparse.Namespace, tmp: Path, procs: Procs) -> None:
    tmp.chmod(0o755)  # nginx's workers run as an unprivileged user and must reach the files
    root = tmp / "www"
    root.mkdir(mode=0o755)
    sizes = {"video.mp4": args.mb * 1024 * 1024}
    if args.big_mb:
        sizes["big.mp4"] = args.big_mb * 1024 * 1024
    for name, size in sizes.items():
        write_file(root / name, size)
        (root / name).chmod(0o644)
    nginx_port, gateway_port = free_port(), free_port()
    conf = nginx_conf(tmp, "files", NGINX_SERVER, PORT=nginx_port, ROOT=root)
    nginx = procs.start("nginx", nginx_argv(tmp, "files", conf))
    origin = f"http://127.0.0.1:{nginx_port}"
    wait_until(lambda: http_get(f"{origin}/video.mp4", headers={"Range": "bytes=0-0"})[0] == 206, "nginx", 10, nginx)
    data = tmp / "data"
    data.mkdir()
    store_url = f"sqlite:///{data / 'gateway.db'}"
    asyncio.run(record_task(store_url, f"{origin}/video.mp4", TASK))
    if args.big_mb:
        asyncio.run(record_task(store_url, f"{origin}/big.mp4", TASK + "_big"))
    env = child_env(
        {
            "UNIALL_BASE_URL": origin,
            "UNIALL_API_KEY": "sk-bench",
            "KLING_GATEWAY_AUTH_MODE": "open",
            "KLING_GATEWAY_SERVER_DATA_DIR": str(data),
            "KLING_GATEWAY_SETTLER_ENABLED": "false",
            "KLING_GATEWAY_LOGGING_ACCESS_LOG": "false",
            "KLING_GATEWAY_ARCHIVE_URL": (tmp / "archive").as_uri(),
            "KLING_GATEWAY_ARCHIVE_LOOKBACK_S": "0",  # nothing is archived until the backfill below
            "KLING_GATEWAY_ARCHIVE_SCAN_S": "3600",
        },
        drop_prefixes=("KLING_GATEWAY_", "UNIALL_"),
    )
    argv = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway_port)]
    gateway = procs.start("gateway", argv, env=env)
    base = f"http://127.0.0.1:{gateway_port}"
    wait_until(lambda: http_get(f"{base}/healthz")[0] == 200, "gateway", 20, gateway, lambda: procs.log_tail("gateway"))
    size = sizes["video.mp4"]
    content = f"{base}/v1/videos/{TASK}/content"
    rows: list[tuple[str, float]] = []
    rows.append(("nginx (static file)", best_speed(f"{origin}/video.mp4", args.rounds, size)))
    rows.append(("gateway, from the upstream", best_speed(content, args.rounds, size)))
    rss: list[tuple[str, int, int, float]] = []
    before, peak, speed = download_rss(content, gateway.pid, size)
    rss.append((f"{args.mb} MiB from the upstream", before, peak, speed))
    if args.big_mb:
        big = f"{base}/v1/videos/{TASK}_big/content"
        before, peak, speed = download_rss(big, gateway.pid, sizes["big.mp4"])
        rss.append((f"{args.big_mb} MiB from the upstream", before, peak, speed))
    backfill = subprocess.run(
        [sys.executable, "-m", "gateway", "archive", "backfill"], env=env, capture_output=True, text=True, check=False
    )
    if not asyncio.run(archived(store_url, TASK)):
        raise RuntimeError(f"the backfill did not archive the video: {backfill.stdout} {backfill.stderr}")
    rows.append(("gateway, from the file archive", best_speed(content, args.rounds, size)))
    before, peak, speed = download_rss(content, gateway.pid, size)
    rss.append((f"{args.mb} MiB from the file archive", before, peak, speed))
    report(args, rows, rss)


def report(args: argparse.Namespace, rows: list[tuple[str, float]], rss: list[tuple[str, int, int, float]]) -> None:
    reference = rows[0][1]
    print(f"\n{args.mb} MiB video, best of {args.rounds} curl downloads over loopback, {os.cpu_count()} CPUs\n")
    print("| served by | MB/s | vs nginx |")
    print("|---|---|---|")
    for name, speed in rows:
        print(f"| {name} | {speed:.0f} | {speed / reference:.2f} |")
    print("\n| gateway RSS during one download | before MiB | peak MiB | rise MiB | MB/s |")
    print("|---|---|---|---|---|")
    for name, before, peak, speed in rss:
        print(f"| {name} | {before / 1024:.1f} | {peak / 1024:.1f} | {(peak - before) / 1024:.1f} | {speed:.0f} |")


if __name__ == "__main__":
    main()
