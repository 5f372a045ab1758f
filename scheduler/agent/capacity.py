"""What this machine offers: CPU cores, memory, GPUs and run slots.

Detection rules (each can be overridden by a command-line flag):

* CPU cores: the CPUs this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``.
* Memory: ``MemTotal`` from ``/proc/meminfo`` in GiB, rounded down (physical pages elsewhere).
* GPUs: one per line of ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader``
  when ``nvidia-smi`` is on PATH; none otherwise, when it fails, says nothing readable or does not
  answer within ``NVIDIA_SMI_TIMEOUT_SECONDS`` (then it and what it started are killed).
* GPU type: from the first GPU's name: drop the vendor and brand words (NVIDIA, GeForce, Tesla,
  Quadro), cut at the first ``-``, then drop memory-size and form-factor words (``80GB``, PCIe,
  SXM4, HBM3, NVL). "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA H100 80GB HBM3" -> "H100",
  "NVIDIA GeForce RTX 4090" -> "RTX 4090". Machines with mixed GPU models report the first one.
* Batch slots: one per GPU; one on a machine without GPUs (a CPU job usually wants the whole box;
  pass ``--batch-slots`` to run several side by side). Service slots: one when this machine can
  serve Jupyter (its Python has ``jupyter_server``, or the ``--container-runtime`` is on PATH),
  else none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scheduler.agent.services import missing_service_support

logger = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_SECONDS = 10.0
_BRAND_WORDS = {"nvidia", "geforce", "tesla", "quadro"}
_QUALIFIER = re.compile(r"^(\d+\s*[gm]i?b|pcie|sxm\d*|hbm\d*e?|nvl|mig)$", re.IGNORECASE)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int


@dataclass(frozen=True)
class Capacity:
    cpu_cores: int
    memory_gb: int
    gpu_count: int
    gpu_type: str
    batch_slots: int
    service_slots: int

    def as_capabilities(self) -> dict[str, Any]:
        return asdict(self)


def gpu_type_from_name(name: str) -> str:
    words = [w for w in name.split() if w.lower() not in _BRAND_WORDS]
    model = " ".join(words).split("-", 1)[0].split()
    kept = [w for w in model if not _QUALIFIER.match(w)]
    return " ".join(kept)


def detect_cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_meminfo_gib(text: str) -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) // (1024 * 1024) if match else None


def detect_memory_gb(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        gib = parse_meminfo_gib(meminfo.read_text())
    except OSError:
        gib = None
    if gib is not None:
        return gib
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024**3
    except (AttributeError, ValueError, OSError):
        return 0


def parse_nvidia_smi(output: str) -> list[Gpu]:
    gpus = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        memory = re.match(r"(\d+)", parts[2])
        gpus.append(Gpu(index=int(parts[0]), name=parts[1], memory_mib=int(memory.group(1)) if memory else 0))
    return gpus


def detect_gpus(*, timeout: float = NVIDIA_SMI_TIMEOUT_SECONDS) -> list[Gpu]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        returncode, stdout, stderr = _run_in_own_group(
            [executable, "--query-gpu=index,name,memory.total", "--format=csv,noheader"], timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi failed, reporting no GPUs: %s", exc)
        return []
    if returncode != 0:
        logger.warning("nvidia-smi exited with %s, reporting no GPUs: %s", returncode, stderr.strip())
        return []
    gpus = parse_nvidia_smi(stdout)
    if not gpus and stdout.strip():
        logger.warning("nvidia-smi said nothing this agent understands, reporting no GPUs: %r", stdout[:200])
    return gpus


def _run_in_own_group(argv: list[str], *, timeout: float) -> tuple[int, str, str]:
    """Run `argv` in a session of its own: on timeout its whole process group is killed, so that
    nothing it started is left holding its pipes. Output is decoded leniently (a driver's odd
    bytes must not stop the agent)."""
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return process.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def detect_capacity(
    *,
    cpus: int | None = None,
    memory_gb: int | None = None,
    gpus: int | None = None,
    gpu_type: str | None = None,
    batch_slots: int | None = None,
    service_slots: int | None = None,
    container_runtime: str = "",
) -> Capacity:
    """Detect what is not given; a given value always wins."""
    if missing := missing_service_support(container_runtime):
        if service_slots is None:
            logger.warning("offering no service slots: %s", missing)
            service_slots = 0
        elif service_slots:
            logger.warning("--service-slots %d, but service runs will fail: %s", service_slots, missing)
    found = detect_gpus() if gpus is None or gpu_type is None else []
    if len({gpu_type_from_name(g.name) for g in found}) > 1:
        logger.warning("mixed GPU models %s; reporting the first one", sorted({g.name for g in found}))
    gpu_count = len(found) if gpus is None else gpus
    if gpu_type is None:
        gpu_type = gpu_type_from_name(found[0].name) if found and gpu_count else ""
    return Capacity(
        cpu_cores=detect_cpu_cores() if cpus is None else cpus,
        memory_gb=detect_memory_gb() if memory_gb is None else memory_gb,
        gpu_count=gpu_count,
        gpu_type=gpu_type,
        batch_slots=(gpu_count or 1) if batch_slots is None else batch_slots,
        service_slots=1 if service_slots is None else service_slots,
    )
