"""Capacity detection: CPU, memory, GPUs through a fake nvidia-smi on PATH, and flags that override it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from scheduler.agent.capacity import (
    detect_capacity,
    detect_cpu_cores,
    detect_gpus,
    gpu_type_from_name,
    parse_meminfo_gib,
)
from scheduler.tests.agent_peer import process_gone
from scheduler.tests.live_system import wait_until

FAKE_SMI = """#!/bin/sh
# Answers only the query the agent makes, so a changed query fails the test.
if [ "$1" = "--query-gpu=index,name,memory.total" ] && [ "$2" = "--format=csv,noheader" ]; then
  echo "0, NVIDIA A100-SXM4-80GB, 81920 MiB"
  echo "1, NVIDIA A100-SXM4-80GB, 81920 MiB"
  exit 0
fi
echo "unexpected arguments: $*" >&2
exit 9
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(FAKE_SMI)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


@pytest.fixture
def no_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def test_gpus_are_detected_with_nvidia_smi(fake_nvidia_smi: Path) -> None:
    capacity = detect_capacity()
    assert (capacity.gpu_count, capacity.gpu_type) == (2, "A100")
    assert capacity.batch_slots == 2
    assert capacity.service_slots == 1


def test_failing_nvidia_smi_means_no_gpus(fake_nvidia_smi: Path) -> None:
    fake_nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    capacity = detect_capacity()
    assert (capacity.gpu_count, capacity.gpu_type, capacity.batch_slots) == (0, "", 1)


@pytest.mark.usefixtures("no_nvidia_smi")
def test_machine_without_gpus_gets_one_batch_slot_and_its_cpus_and_memory() -> None:
    capacity = detect_capacity()
    assert (capacity.gpu_count, capacity.gpu_type, capacity.batch_slots, capacity.service_slots) == (0, "", 1, 1)
    assert capacity.cpu_cores == len(os.sched_getaffinity(0))
    assert capacity.memory_gb == parse_meminfo_gib(Path("/proc/meminfo").read_text())


def test_flags_override_detection(fake_nvidia_smi: Path) -> None:
    capacity = detect_capacity(cpus=3, memory_gb=7, gpus=1, gpu_type="H100", batch_slots=4, service_slots=0)
    assert capacity.as_capabilities() == {
        "cpu_cores": 3,
        "memory_gb": 7,
        "gpu_count": 1,
        "gpu_type": "H100",
        "batch_slots": 4,
        "service_slots": 0,
    }


def test_gpu_count_flag_keeps_the_detected_type(fake_nvidia_smi: Path) -> None:
    capacity = detect_capacity(gpus=1)
    assert (capacity.gpu_count, capacity.gpu_type, capacity.batch_slots) == (1, "A100", 1)


def test_zero_gpus_flag_reports_no_gpu_type(fake_nvidia_smi: Path) -> None:
    assert detect_capacity(gpus=0).gpu_type == ""


@pytest.mark.parametrize(
    ("name", "gpu_type"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("Quadro RTX 6000", "RTX 6000"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("NVIDIA L40S", "L40S"),
    ],
)
def test_gpu_type_is_the_model_from_the_name(name: str, gpu_type: str) -> None:
    assert gpu_type_from_name(name) == gpu_type


def test_memory_is_whole_gib_rounded_down() -> None:
    assert parse_meminfo_gib("MemTotal:       16777215 kB\nMemFree: 1 kB\n") == 15
    assert parse_meminfo_gib("MemTotal:       16777216 kB\n") == 16
    assert parse_meminfo_gib("nothing useful") is None


def test_cpu_cores_are_those_this_process_may_use() -> None:
    assert detect_cpu_cores() == len(os.sched_getaffinity(0))


@pytest.fixture
def no_jupyter_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jupyter_server", None)  # find_spec() then answers None: not importable


@pytest.mark.usefixtures("no_nvidia_smi", "no_jupyter_server")
def test_machine_that_cannot_serve_jupyter_offers_no_service_slot_by_default() -> None:
    assert detect_capacity().service_slots == 0


@pytest.mark.usefixtures("no_nvidia_smi")
def test_container_runtime_missing_from_path_means_no_service_slot_by_default() -> None:
    assert detect_capacity(container_runtime="podman").service_slots == 0


@pytest.mark.usefixtures("no_nvidia_smi", "no_jupyter_server")
def test_service_slots_flag_wins_even_where_jupyter_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    assert detect_capacity(service_slots=2).service_slots == 2
    assert "service runs will fail" in caplog.text


def test_nvidia_smi_output_that_is_not_utf8_means_no_gpus_and_a_warning(
    fake_nvidia_smi: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvidia_smi.write_text("#!/bin/sh\nprintf '\\377\\376 garbage \\351\\n'\n")

    capacity = detect_capacity()

    assert (capacity.gpu_count, capacity.gpu_type, capacity.batch_slots) == (0, "", 1)
    assert "reporting no GPUs" in caplog.text


def test_a_gpu_name_that_is_not_utf8_still_counts_its_gpus(fake_nvidia_smi: Path) -> None:
    fake_nvidia_smi.write_text(
        "#!/bin/sh\nprintf '0, NVIDIA A100\\351-SXM4-80GB, 81920 MiB\\n1, NVIDIA A100\\351-SXM4-80GB, 81920 MiB\\n'\n"
    )

    capacity = detect_capacity()

    assert (capacity.gpu_count, capacity.batch_slots) == (2, 2)


def test_a_hanging_nvidia_smi_and_what_it_started_are_killed_after_the_timeout(
    fake_nvidia_smi: Path, tmp_path: Path
) -> None:
    fake_nvidia_smi.write_text(
        f"#!/bin/sh\nsleep 300 &\necho $! > {tmp_path}/grandchild\necho $$ > {tmp_path}/nvidia-smi\nwait\n"
    )

    assert detect_gpus(timeout=2) == []

    pids = [int((tmp_path / name).read_text()) for name in ("nvidia-smi", "grandchild")]
    wait_until(lambda: all(map(process_gone, pids)), timeout=5, what=f"processes {pids} to die")
