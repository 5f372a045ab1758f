"""The dispatch benchmark's worker client (bench/dispatch.py) still speaks the worker protocol the
server speaks: against a live server it is welcomed, gets an `assign`, and has it completed."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from fetchml.testing import HOST, database_url_for
from fetchml.tests.factories import ApiKeyFactory, UserFactory
from scheduler.tests.live_system import LiveSystem

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _bench_module():
    spec = importlib.util.spec_from_file_location("dispatch_bench", settings.BASE_DIR / "bench" / "dispatch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses and annotations look the module up
    spec.loader.exec_module(module)
    return module


def test_a_bench_worker_gets_a_submitted_task_and_completes_it(tmp_path: Path) -> None:
    bench = _bench_module()
    owner_key = ApiKeyFactory.raw(user=UserFactory(username="bench-owner"), role="user")
    worker_key = ApiKeyFactory.raw(user=UserFactory(username="bench-fleet"), role="worker")

    with LiveSystem(tmp_path=tmp_path, database_url=database_url_for(connection)) as system:

        async def scenario() -> tuple[dict, int, dict[str, list[float]]]:
            arrivals: dict[str, list[float]] = {}
            completions = bench.Completions()
            worker = bench.BenchWorker(
                f"ws://{HOST}:{system.port}/ws/worker", worker_key, "bench-0", arrivals, completions
            )
            async with bench.Fleet([worker]):
                task = await asyncio.to_thread(system.submit, owner_key, entrypoint="true")
                await completions.reached(1, stalled_after=30)
            return task, worker.server_errors, arrivals

        task, server_errors, arrivals = asyncio.run(scenario())
        done = system.wait_for_status(owner_key, task["id"], "completed")

    assert list(arrivals) == [task["id"]]
    assert (done["exit_code"], server_errors) == (0, 0)
