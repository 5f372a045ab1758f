"""The procrastinate side of `bench/dispatch.py --compare procrastinate`: an app and two no-op tasks.

The benchmark's worker processes load it with procrastinate's own CLI
(`python -m procrastinate --app=procrastinate_app.app worker`, with this
folder on PYTHONPATH); the script imports it to apply the schema and defer
jobs. The database comes from FETCHML_BENCH_PROCRASTINATE_DSN, read at import.

- `noop`: does nothing (the throughput workload);
- `stamp`: appends `<key> <time.monotonic()>` to the file named by
  FETCHML_BENCH_PROCRASTINATE_STAMPS as soon as it starts (the latency
  workload; CLOCK_MONOTONIC is shared by every process of the machine).
"""

from __future__ import annotations

import os
import time

import procrastinate

DSN_ENV = "FETCHML_BENCH_PROCRASTINATE_DSN"
STAMPS_ENV = "FETCHML_BENCH_PROCRASTINATE_STAMPS"

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ.get(DSN_ENV, "")))


@app.task(name="noop")
async def noop() -> None:
    return None


@app.task(name="stamp")
async def stamp(key: str) -> None:
    started = time.monotonic()
    with open(os.environ[STAMPS_ENV], "a", encoding="utf-8") as stamps:
        stamps.write(f"{key} {started}\n")
