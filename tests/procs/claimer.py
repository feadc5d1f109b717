"""A minimal worker process for concurrency and crash tests: the real claim/complete path, no backend.

usage: claimer.py URL QUEUE MODE [BATCH] [LEASE] [SECRET]
  MODE drain: claim batches and complete them until the queue stays empty; print each "job_id attempt".
  MODE hang:  claim one job, print "job_id attempt token secret", then sleep (to be killed mid-job).
  MODE register: register (with SECRET), print the instance id, exit.
Without SECRET it enrolls an instance of its own (the URL's login must have the manager's rights).
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
    secret = sys.argv[6] if len(sys.argv) > 6 else None
    settings = Settings(None, Settings.from_env().data_dir, False, lease, 0.1)
    with Client.connect(url, settings) as client:
        if secret is None:
            _, secret = client.enroll([queue], max_concurrency=max(batch, 1))
        instance = client.as_instance(secret)
        if mode == "register":
            print(instance.register().instance_id, flush=True)
            return
        if mode == "hang":
            while not (jobs := instance.claim([queue], 1)):
                time.sleep(0.05)
            print(jobs[0].id, jobs[0].attempt, jobs[0].lease_token, secret, flush=True)
            time.sleep(3600)
        empty_since = None
        while True:
            jobs = instance.claim([queue], batch)
            if not jobs:
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since > 1.0:
                    return
                time.sleep(0.02)
                continue
            empty_since = None
            for job in jobs:
                print(job.id, job.attempt, flush=True)
            instance.complete_many([(j.id, j.lease_token, {"by": os.getpid()}) for j in jobs])  # type: ignore[misc]


if __name__ == "__main__":
    main()
