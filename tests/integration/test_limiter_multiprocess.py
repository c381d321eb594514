"""Three OS processes share one Redis limiter at Q=5 for ~6 s: no 1-second window may hold
more than 5 "calls", and the full windows must be ≥ 98% used."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter

import pytest

from worker.quota.limiter import limiter_key

pytestmark = pytest.mark.integration

QPS = 5
PROCESSES = 3
RUN_S = 6.0

# Each process: wait for the common start, then reserve -> sleep wait_s -> "call" (record
# the wall time, which is the clock Redis TIME reads on this host), until the end.
CHILD = """
import asyncio, json, sys, time
from worker.quota.limiter_redis import RedisRateLimiter
from worker.quota.state import state_redis

async def main(url, key, qps, start_at, end_at):
    client = state_redis(url)
    limiter = RedisRateLimiter(client, qps=qps)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    calls = []
    while time.time() < end_at:
        reservation = await limiter.reserve(key, max_wait_s=30)
        assert reservation.granted
        await asyncio.sleep(reservation.wait_s)
        calls.append(time.time())
    await client.aclose()
    print(json.dumps(calls))

url, key, qps, start_at, end_at = sys.argv[1:6]
asyncio.run(main(url, key, float(qps), float(start_at), float(end_at)))
"""


def test_three_processes_share_the_quota_exactly(clean_redis: str) -> None:
    key = limiter_key("AKIDMULTI", "RecognizeMacaoIDCardOCR", "https://ocr.test")
    start_at = time.time() + 3.0  # leave time for the interpreters to start
    end_at = start_at + RUN_S
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, clean_redis, key, str(QPS), str(start_at), str(end_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    calls: list[float] = []
    per_process = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        times = json.loads(out)
        per_process.append(len(times))
        calls.extend(times)
    # Every process really took part.
    assert all(count >= 5 for count in per_process), per_process

    windows = Counter(math.floor(t) for t in calls)
    assert max(windows.values()) <= QPS, sorted(windows.items())
    # Whole windows strictly inside the run (the first and last are partial).
    inner = range(math.floor(start_at) + 1, math.floor(end_at))
    assert len(inner) >= 5
    used = sum(windows[k] for k in inner)
    assert used >= 0.98 * QPS * len(inner), (used, [windows[k] for k in inner])
