"""Keep the agent's worker key from its runs.

Runs are started with the agent's environment less the key (`runner.WITHHELD_FROM_TASKS`), but they
run as the agent's Unix user: as such, any of them could read the agent's ``/proc/<pid>/environ``
(the environment it was started with, whatever it later removes from ``os.environ``) or its memory,
or ptrace it, and take the key. With it anyone can connect to ``/ws/worker`` as a worker and be sent
other users' runs, their environment and plugin secrets with them.

`hide_from_runs`, called once at the agent's start before any run, makes the agent process not
dumpable (``prctl(PR_SET_DUMPABLE, 0)``, Linux): its ``/proc/<pid>/`` entries then belong to root,
and a process of the same user without ``CAP_SYS_PTRACE`` can neither read its environment, memory
or open files there nor ptrace it. The agent still reads its own (``/proc/self``), and its children's
``/proc`` entries are unaffected: the flag is reset when a child execs, so runs are ordinary processes.
Core dumps of the agent are off as a consequence. Elsewhere than Linux it does nothing (logged).

Not hidden: the agent's command line (``/proc/<pid>/cmdline``, `ps`), readable by every user of the
machine, hence ``--api-key-file`` and the environment variable rather than ``--api-key``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4


def hide_from_runs() -> bool:
    """Make this process not dumpable (Linux); whether it is now. Logs one line either way."""
    if not sys.platform.startswith("linux"):
        logger.info("no prctl on this platform: this agent's environment is not hidden from its runs")
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
        error = ctypes.get_errno()
    except (OSError, AttributeError) as exc:  # no C library to load, or one without prctl
        failed, error = True, getattr(exc, "errno", 0) or 0
    if failed:
        logger.warning(
            "cannot make this agent non-dumpable (%s): its runs may read its environment and memory",
            os.strerror(error) if error else "prctl unavailable",
        )
        return False
    logger.info("this agent's environment and memory are hidden from its runs (not dumpable)")
    return True
