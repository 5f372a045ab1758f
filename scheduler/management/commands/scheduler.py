"""`manage.py scheduler`: run the scheduler loop in its own process (any number of copies)."""

import asyncio
import logging
import signal

from django.core.management.base import BaseCommand

from scheduler.loop import SchedulerLoop

logger = logging.getLogger("fetchml.scheduler")


class Command(BaseCommand):
    help = (
        "Run the scheduler: expire worker leases, re-send unacknowledged assignments and dispatch queued tasks "
        "to free workers, woken at once by new work and every FETCHML_SCHEDULER_INTERVAL seconds otherwise. "
        "Safe to run several copies. SIGTERM or Ctrl-C stops it after the current pass."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help=(
                "run a single pass and exit; it expires no worker lease (a process that has just started "
                "cannot tell a silent worker from a database that was out of reach)"
            ),
        )

    def handle(self, *args, once: bool, **options) -> None:
        loop = SchedulerLoop()
        if once:
            worked = loop.run_once()
            logger.info("single pass done (%s)", "work done" if worked else "nothing to do")
            return
        asyncio.run(self._serve(loop))

    async def _serve(self, loop: SchedulerLoop) -> None:
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            logger.info("received %s; stopping after the current pass", signal.Signals(signum).name)
            stop.set()

        event_loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            event_loop.add_signal_handler(signum, on_signal, signum)
        await loop.run(stop)
