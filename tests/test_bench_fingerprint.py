"""Machine fingerprint: read from fake /proc and /sys trees; every probe tolerant of what is missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conveyor.config import parse_model_config
from conveyor.profile.fingerprint import (
    config_sha256,
    file_sha256,
    git_commit,
    machine_fingerprint,
    software_versions,
)

MLPERF_FIELDS = (
    "system_name", "number_of_nodes", "host_processor_model_name", "host_processors_per_node",
    "host_processor_core_count", "host_memory_capacity", "host_storage_capacity", "host_storage_type",
    "accelerators_per_node", "accelerator_model_name", "accelerator_memory_capacity", "framework",
    "operating_system", "other_software_stack",
)  # fmt: skip

CPUINFO = "".join(
    f"processor\t: {i}\nmodel name\t: Example CPU 9000\nphysical id\t: {i // 4}\ncore id\t\t: {(i % 4) // 2}\n"
    f"cpu MHz\t\t: {2000 + 100 * i}.000\nflags\t\t: fpu sse4_2 avx avx2 fma hypervisor avx512f\n\n"
    for i in range(8)
)  # two sockets, two cores each, two threads per core


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_machine(tmp_path: Path, *, cgroup_v2: bool) -> tuple[Path, Path]:
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    write(proc / "cpuinfo", CPUINFO)
    write(proc / "meminfo", "MemTotal:       16384000 kB\nMemFree: 1 kB\n")
    write(sys_root / "devices/system/cpu/smt/active", "1\n")
    write(sys_root / "devices/system/cpu/cpu0/cpufreq/scaling_governor", "performance\n")
    write(sys_root / "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "3500000\n")
    write(sys_root / "devices/system/node/node0/cpulist", "0-3")
    write(sys_root / "devices/system/node/node1/cpulist", "4-7")
    write(sys_root / "class/dmi/id/sys_vendor", "QEMU\n")
    if cgroup_v2:
        write(proc / "self/cgroup", "0::/job\n")
        write(sys_root / "fs/cgroup/job/cpu.max", "150000 100000\n")
        write(sys_root / "fs/cgroup/job/memory.max", "1073741824\n")
    else:
        write(proc / "self/cgroup", "4:memory:/job\n3:cpu,cpuacct:/job\n")
        write(sys_root / "fs/cgroup/cpu/job/cpu.cfs_quota_us", "200000\n")
        write(sys_root / "fs/cgroup/cpu/job/cpu.cfs_period_us", "100000\n")
        write(sys_root / "fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    return proc, sys_root


def fake_nvidia_smi(argv: list[str]) -> str | None:
    if argv[0] != "nvidia-smi":
        return None
    if len(argv) > 1:
        return "NVIDIA H100 80GB HBM3, 81559, 550.54.15\n"
    return "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |\n"


def test_fingerprint_from_a_fake_machine_with_cgroup_v2_and_a_gpu(tmp_path: Path) -> None:
    proc, sys_root = fake_machine(tmp_path, cgroup_v2=True)
    found = machine_fingerprint(proc=proc, sys_root=sys_root, root=tmp_path, run=fake_nvidia_smi)
    assert all(field in found for field in MLPERF_FIELDS)
    assert found["host_processor_model_name"] == "Example CPU 9000"
    assert found["host_processors_per_node"] == 2 and found["host_processor_core_count"] == 2
    assert found["host_memory_bytes"] == 16384000 * 1024 and found["host_memory_capacity"] == "17 GB"
    cpu = found["cpu"]
    assert cpu["flags"] == ["avx", "avx2", "avx512f", "fma", "sse4_2"]
    assert cpu["physical_cores"] == 4 and cpu["smt"] is True and cpu["governor"] == "performance"
    assert cpu["frequency_mhz"] == 2350.0 and cpu["max_frequency_mhz"] == 3500.0
    assert cpu["isa_path"] in ("baseline", "avx2")  # what the compiled kernels chose on this machine
    assert found["numa_nodes"] == 2
    assert found["cgroup"] == {"cpu_quota_cores": 1.5, "memory_limit_bytes": 1073741824}
    assert found["virtualization"]["vm"] == "QEMU"
    assert found["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 81559 * 1024 * 1024,
                              "driver": "550.54.15", "cuda": "12.4"}]  # fmt: skip
    assert found["accelerators_per_node"] == 1 and found["accelerator_model_name"] == "NVIDIA H100 80GB HBM3"


def test_cgroup_v1_quota_and_an_unlimited_memory_limit(tmp_path: Path) -> None:
    proc, sys_root = fake_machine(tmp_path, cgroup_v2=False)
    found = machine_fingerprint(proc=proc, sys_root=sys_root, root=tmp_path, run=lambda argv: None)
    assert found["cgroup"] == {"cpu_quota_cores": 2.0, "memory_limit_bytes": None}
    assert found["gpus"] == [] and found["accelerators_per_node"] == 0


def test_an_empty_machine_gives_nulls_never_an_exception(tmp_path: Path) -> None:
    found = machine_fingerprint(proc=tmp_path / "none", sys_root=tmp_path / "none", root=tmp_path / "none",
                                run=lambda argv: None)  # fmt: skip
    assert found["host_memory_capacity"] is None and found["host_storage_type"] is None
    assert found["cpu"]["governor"] is None and found["cpu"]["physical_cores"] is None
    assert found["cgroup"] == {"cpu_quota_cores": None, "memory_limit_bytes": None}
    assert found["virtualization"]["vm"] is None and found["numa_nodes"] is None


def test_this_machine_fingerprints() -> None:
    found = machine_fingerprint()
    assert found["cpu"]["logical_cpus"] >= 1 and found["affinity_cpus"]


def test_git_commit_only_from_a_checkout(tmp_path: Path) -> None:
    commit = "a" * 40

    def fake_git(argv: list[str]) -> str | None:
        return commit + "\n" if "rev-parse" in argv else " M file.py\n"

    assert git_commit(tmp_path / "src" / "conveyor", fake_git) == (commit, True)
    assert git_commit(tmp_path / "lib" / "site-packages" / "conveyor", fake_git) == (None, None)
    assert git_commit(tmp_path, lambda argv: None) == (None, None)
    assert git_commit(tmp_path, lambda argv: "fatal: not a git repository") == (None, None)
    versions = software_versions(run=lambda argv: None)
    assert versions["git_commit"] is None and versions["python"].count(".") == 2


def test_hashes(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    assert file_sha256(model) == hashlib.sha256(b"weights").hexdigest()
    assert file_sha256(tmp_path / "absent") is None
    one = parse_model_config({"name": "m", "backend": "onnx", "max_batch_size": 8}, source="a", name="m")
    same = parse_model_config({"backend": "onnx", "name": "m", "max_batch_size": 8}, source="b", name="m")
    other = parse_model_config({"name": "m", "backend": "onnx", "max_batch_size": 16}, source="c", name="m")
    assert config_sha256(one) == config_sha256(same) != config_sha256(other)
