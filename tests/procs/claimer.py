"""A minimal worker process for concurrency and crash tests: the real claim/complete path, no backend.

usage: claimer.py URL QUEUE MODE [BATCH] [LEASE]
  MODE drain: claim batches and complete them until the queue stays empty; print each "job_id attempt".
  MODE hang:  claim one job, print it, then sleep (to be killed with SIGKILL mid-job).
"""

from __future__ import annotations

import os
import sys
import time

from gpuq.client import Client
from gpuq.settings import Settings


def main() -> None:
    url, queue, mode = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    lease = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    settings = Settings(None, Settings.from_env().data_dir, False, lease, 0.1)
    with Client.connect(url, settings) as client:
        instance = client.register_instance("manual", f"pid-{os.getpid()}", queues=[queue])
        if mode == "hang":
            while not (jobs := client.claim(instance, [queue], 1)):
                time.sleep(0.05)
            print(jobs[0].id, jobs[0].attempt, flush=True)
            time.sleep(3600)
        empty_since = None
        while True:
            jobs = client.claim(instance, [queue], batch)
            if not jobs:
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since > 1.0:
                    return
                time.sleep(0.02)
                continue
            empty_since = None
            for job in jobs:
                print(job.id, job.attempt, flush=True)
            client.complete_many([(j.id, j.attempt, {"by": os.getpid()}) for j in jobs])


if __name__ == "__main__":
    main()
