"""The worker's own overhead per job outside inference: claim, input fetch, upload, complete.

    .venv/bin/python scripts/bench_worker.py              # 200 jobs, 1 MB PNG in and out via S3 (moto)
    .venv/bin/python scripts/bench_worker.py -n 500 --local-input

The real Worker (worker/main.py) runs in this process with the imageops backend and no ops, so
"inference" is only decoding and re-encoding a ~1 MB incompressible PNG. Outputs go to S3 through
boto3 against moto's ThreadedMotoServer on 127.0.0.1; the input is fetched from the same bucket (or
from a local file with --local-input). Postgres is a fresh database on the server at --url.

Jobs are queued up front and the worker (concurrency 1) drains them; per job it records each phase.
"overhead" = claim + fetch + upload + complete; "wall - inference" also counts the worker's own
hand-offs between phases (wall = time from the first claim to the last complete, divided by N).
Goal: overhead p50 <= 30 ms.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import psycopg
from moto.server import ThreadedMotoServer
from PIL import Image
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gpuq.client import Client
from gpuq.db import connect
from gpuq.migrate import migrate
from gpuq.settings import Settings
from worker.backends.imageops import ImageOpsBackend
from worker.config import WorkerSettings
from worker.main import Worker
from worker.storage import storage_from_url

ADMIN_URL = os.environ.get("GPUQ_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BUCKET = "bench"
WARMUP = 5  # jobs left out of the figures: connection set-up and psycopg's prepare after 5 uses


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200, help="jobs (default 200)")
    ap.add_argument(
        "--url", default=ADMIN_URL, help="admin URL of the Postgres server to create a database on"
    )
    ap.add_argument("--local-input", action="store_true", help="fetch the input from a local file, not S3")
    ap.add_argument("--side", type=int, default=600, help="image side in pixels (600: a ~1.05 MB PNG)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        os.environ[name] = value
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["GPUQ_S3_ENDPOINT_URL"] = endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)

    dbname = f"gpuq_bench_worker_{secrets.token_hex(3)}"
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(f'create database "{dbname}"')
    url = make_conninfo(args.url, dbname=dbname)
    tmp = Path(tempfile.mkdtemp(prefix="gpuq-bench-worker-"))
    try:
        settings = Settings(url, tmp, False, 60, 1.0)
        with connect(url, settings) as conn:
            migrate(conn)

        # ~1 MB of noise: PNG cannot compress it, so the output really is that size
        rng = np.random.default_rng(1)
        src = tmp / "input.png"
        Image.fromarray(rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)).save(src)
        if args.local_input:
            image_ref = str(src)
        else:
            boto3.client("s3", endpoint_url=endpoint).upload_file(str(src), BUCKET, "inputs/input.png")
            image_ref = f"s3://{BUCKET}/inputs/input.png"

        config = WorkerSettings.from_env(
            settings,
            {
                "GPUQ_QUEUES": "bench=imageops",
                "GPUQ_SPOT_WATCH": "0",
                "GPUQ_STORAGE_URL": f"s3://{BUCKET}/out",
                "GPUQ_INPUT_DIRS": str(tmp),  # --local-input reads from there
            },
        )
        worker = Worker(
            url, settings, config, {"imageops": ImageOpsBackend()}, storage_from_url(config.storage_url)
        )
        with Client.connect(url, settings) as client:
            ids = [client.enqueue("bench", {"image": image_ref, "format": "png"}) for _ in range(args.n)]
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 600
            while len(worker.phase_log) < args.n and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.request_drain("benchmark done")
            thread.join(30)
            row = client.conn.execute(
                "select count(*) filter (where status = 'succeeded') as ok, "
                "extract(epoch from max(finished_at) - min(started_at)) as wall, "
                "min((result->'outputs'->0->>'bytes')::int) as bytes from gpuq.jobs where id = any(%s)",
                (ids,),
            ).fetchone()
        assert row is not None and row["ok"] == args.n, f"only {row} of {args.n} succeeded"

        runs = list(worker.phase_log)[WARMUP:]
        phases = ["claim", "fetch", "upload", "complete"]
        print(
            f"{len(runs)} jobs (after {WARMUP} warm-up), concurrency 1, output {row['bytes'] / 1e6:.2f} MB "
            f"to S3 (moto on {endpoint}), input from {'a local file' if args.local_input else 'S3'}"
        )
        print(f"{'phase':<22}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}")
        series = {p: [r[p] for r in runs] for p in [*phases, "inference"]}
        series["overhead (sum)"] = [sum(r[p] for p in phases) for r in runs]
        for name, values in series.items():
            print(
                f"{name:<22}{pct(values, 50) * 1000:>9.2f}{pct(values, 95) * 1000:>9.2f}"
                f"{statistics.fmean(values) * 1000:>9.2f}"
            )
        wall_per_job = float(row["wall"]) / args.n
        print(
            f"wall per job {wall_per_job * 1000:.2f} ms, minus mean inference: "
            f"{(wall_per_job - statistics.fmean(series['inference'])) * 1000:.2f} ms"
        )
        ok = pct(series["overhead (sum)"], 50) <= 0.030
        print(f"goal overhead p50 <= 30 ms: {'met' if ok else 'NOT met'}")
        return 0
    finally:
        moto.stop()
        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


if __name__ == "__main__":
    sys.exit(main())
