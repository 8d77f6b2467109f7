"""What a result was measured on: the machine, the software and the model, so any number traces back to them.

`machine_fingerprint()` uses MLPerf's system-description field names (`system_name`,
`host_processor_model_name`, ...) and adds what decides speed on CPUs: the flags that
matter, the instruction set Conveyor's kernels chose, cores and SMT, the frequency
governor, the cgroup CPU quota and memory limit, the CPU affinity, container or VM; and
on GPUs what nvidia-smi reports. Every probe is tolerant: a file or tool that is not there
gives null, never an exception, so a bench run never fails for want of a /sys file.

`software_versions()`, `file_sha256()` and `config_sha256()` fill a bundle's "software"
block and the model's hashes (compare refuses to rank bundles whose model hashes differ).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# CPU flags that change which kernels run (x86 and Arm names as /proc/cpuinfo spells them).
FLAGS_OF_INTEREST = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp", "sve", "sve2", "i8mm",
    "bf16",
)  # fmt: skip
_CONTAINER_MARKERS = ("docker", "kubepods", "containerd", "lxc", "libpod", "podman")
_HYPERVISORS = {"kvm": "KVM", "qemu": "QEMU", "vmware": "VMware", "microsoft": "Hyper-V", "xen": "Xen",
                "amazon": "Amazon EC2 (Nitro)", "google": "Google Compute Engine", "virtualbox": "VirtualBox",
                "innotek": "VirtualBox", "parallels": "Parallels", "openstack": "OpenStack"}  # fmt: skip
_COMMAND_TIMEOUT_S = 10.0

RunCommand = Callable[[list[str]], "str | None"]


def run_command(argv: list[str]) -> str | None:
    """stdout of `argv` when it exists and exits 0 within 10 s, else None."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------- the machine


def machine_fingerprint(*, proc: Path = Path("/proc"), sys_root: Path = Path("/sys"), root: Path = Path("/"),
                        run: RunCommand = run_command) -> dict[str, Any]:  # fmt: skip
    """The machine's description: MLPerf system-description fields plus cpu, cgroup, affinity, virtualization, gpus.

    `proc`, `sys_root`, `root` and `run` are where it looks (tests point them at fake trees).
    """
    cpuinfo = _parse_cpuinfo(_read(proc / "cpuinfo") or "")
    cpu = _cpu(cpuinfo, sys_root)
    gpus = _gpus(run)
    memory_bytes = _memory_bytes(proc)
    storage_bytes, storage_type = _storage(root, sys_root)
    sockets = len({entry.get("physical id") for entry in cpuinfo if "physical id" in entry}) or None
    cores = cpu["physical_cores"]
    return {
        "system_name": platform.node() or None,
        "number_of_nodes": 1,
        "host_processor_model_name": _first(cpuinfo, "model name") or platform.processor() or None,
        "host_processors_per_node": sockets,
        "host_processor_core_count": cores // sockets if cores and sockets else cores,
        "host_memory_capacity": _capacity(memory_bytes),
        "host_memory_bytes": memory_bytes,
        "host_storage_capacity": _capacity(storage_bytes),
        "host_storage_type": storage_type,
        "accelerators_per_node": len(gpus),
        "accelerator_model_name": gpus[0]["name"] if gpus else None,
        "accelerator_memory_capacity": _capacity(gpus[0]["memory_bytes"]) if gpus else None,
        "framework": _framework(),
        "operating_system": _operating_system(root),
        "other_software_stack": _software_stack(),
        "cpu": cpu,
        "numa_nodes": len(list((sys_root / "devices/system/node").glob("node[0-9]*"))) or None,
        "cgroup": _cgroup(proc, sys_root),
        "affinity_cpus": _affinity(),
        "virtualization": {"container": _in_container(proc, root), "vm": _hypervisor(cpuinfo, sys_root)},
        "gpus": gpus,
    }


def _parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (blocks separated by blank lines)."""
    entries: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entry[key.strip()] = value.strip()
        if entry:
            entries.append(entry)
    return entries


def _first(cpuinfo: list[dict[str, str]], key: str) -> str | None:
    return next((entry[key] for entry in cpuinfo if key in entry), None)


def _cpu(cpuinfo: list[dict[str, str]], sys_root: Path) -> dict[str, Any]:
    flags = set((_first(cpuinfo, "flags") or _first(cpuinfo, "Features") or "").split())
    logical = os.cpu_count()
    physical = len({(e.get("physical id"), e["core id"]) for e in cpuinfo if "core id" in e}) or None
    smt_active = _read(sys_root / "devices/system/cpu/smt/active")
    smt = smt_active == "1" if smt_active in ("0", "1") else (logical > physical if logical and physical else None)
    speeds = [float(e["cpu MHz"]) for e in cpuinfo if _is_number(e.get("cpu MHz"))]
    max_khz = _int(_read(sys_root / "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"))
    return {
        "flags": sorted(flags.intersection(FLAGS_OF_INTEREST)),
        "isa_path": _kernel_isa(),
        "logical_cpus": logical,
        "physical_cores": physical,
        "smt": smt,
        "governor": _read(sys_root / "devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "frequency_mhz": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "max_frequency_mhz": max_khz / 1000 if max_khz else None,
    }


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and float(text) >= 0
    except ValueError:
        return False


def _kernel_isa() -> str | None:
    """The instruction set Conveyor's CPU kernels dispatch to ('baseline', 'avx2'), from the C++ core."""
    try:
        from conveyor import _core

        return str(_core.kernels_cpu_isa())
    except Exception as exc:  # a build without the kernels must still fingerprint
        log.debug("the kernels' ISA is unknown: %s", exc)
        return None


def _memory_bytes(proc: Path) -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", _read(proc / "meminfo") or "", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _storage(root: Path, sys_root: Path) -> tuple[int | None, str | None]:
    """Size of the file system at `root`, and SSD / HDD from its block device's rotational flag."""
    try:
        total = shutil.disk_usage(root).total
        device = os.stat(root).st_dev
    except OSError:
        return None, None
    block = sys_root / "dev/block" / f"{os.major(device)}:{os.minor(device)}"
    for directory in (block, block / ".."):  # a partition's flag sits on its disk
        rotational = _read(directory / "queue/rotational")
        if rotational in ("0", "1"):
            return total, "HDD" if rotational == "1" else "SSD"
    return total, None


def _capacity(size_bytes: int | None) -> str | None:
    """MLPerf writes capacities as text ("512 GB"); the exact bytes sit beside where they matter."""
    if not size_bytes:
        return None
    gigabytes = size_bytes / 1e9
    return f"{gigabytes:.0f} GB" if gigabytes >= 10 else f"{gigabytes:.1f} GB"


def _framework() -> str:
    parts = [f"conveyor {_package_version('conveyor-serve') or 'source'}"]
    onnxruntime = _package_version("onnxruntime")
    if onnxruntime:
        parts.append(f"onnxruntime {onnxruntime}")
    return ", ".join(parts)


def _operating_system(root: Path) -> str:
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', _read(root / "etc/os-release") or "", re.MULTILINE)
    name = match.group(1) if match else platform.system()
    return f"{name} (kernel {platform.release()})"


def _software_stack() -> str:
    parts = [f"Python {platform.python_version()}"]
    for package in ("numpy", "scipy", "pyarrow"):
        found = _package_version(package)
        if found:
            parts.append(f"{package} {found}")
    return ", ".join(parts)


def _cgroup(proc: Path, sys_root: Path) -> dict[str, Any]:
    """CPU quota (in cores) and memory limit of this process's cgroup (v2, else v1); null where unlimited or unknown."""
    paths = {}
    for line in (_read(proc / "self/cgroup") or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path.lstrip("/")
    base = sys_root / "fs/cgroup"

    def candidates(controller: str, name: str) -> list[Path]:
        # A cgroup namespace mounts the process's own cgroup at the root: try its path, then the root.
        mount = base / controller if controller else base
        return [mount / paths.get(controller, "") / name, mount / name]

    quota = None
    for path in candidates("", "cpu.max"):
        fields = (_read(path) or "").split()
        if len(fields) == 2:
            quota = None if fields[0] == "max" else _ratio(_int(fields[0]), _int(fields[1]))
            break
    else:
        v1_files = zip(candidates("cpu", "cpu.cfs_quota_us"), candidates("cpu", "cpu.cfs_period_us"))
        for quota_path, period_path in v1_files:
            quota_us, period_us = _int(_read(quota_path)), _int(_read(period_path))
            if quota_us is not None:
                quota = _ratio(quota_us, period_us) if quota_us > 0 else None
                break
    return {"cpu_quota_cores": quota, "memory_limit_bytes": _memory_limit(candidates)}


def _memory_limit(candidates: Callable[[str, str], list[Path]]) -> int | None:
    for path in candidates("", "memory.max"):
        text = _read(path)
        if text is not None:
            return _int(text)  # "max" -> None
    for path in candidates("memory", "memory.limit_in_bytes"):
        limit = _int(_read(path))
        if limit is not None:
            return limit if limit < 2**62 else None  # v1 writes "unlimited" as a page-rounded 2^63
    return None


def _ratio(quota: int | None, period: int | None) -> float | None:
    return round(quota / period, 3) if quota and period else None


def _affinity() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def _in_container(proc: Path, root: Path) -> bool:
    if (root / ".dockerenv").exists() or (root / "run/.containerenv").exists() or os.environ.get("container"):
        return True
    text = (_read(proc / "1/cgroup") or "").lower()
    return any(marker in text for marker in _CONTAINER_MARKERS)


def _hypervisor(cpuinfo: list[dict[str, str]], sys_root: Path) -> str | None:
    """The hypervisor's name when this runs in a VM (the cpu flag, then DMI and /sys/hypervisor), else None."""
    declared = (_read(sys_root / "hypervisor/type") or "").lower()
    flagged = "hypervisor" in (_first(cpuinfo, "flags") or "").split()
    if not flagged and not declared:
        return None
    texts = [declared] + [(_read(sys_root / "class/dmi/id" / name) or "").lower()
                          for name in ("sys_vendor", "product_name", "bios_vendor")]  # fmt: skip
    for text in texts:
        for marker, name in _HYPERVISORS.items():
            if marker in text:
                return name
    return "unknown hypervisor"


def _gpus(run: RunCommand) -> list[dict[str, Any]]:
    """One entry per NVIDIA GPU from nvidia-smi: name, memory_bytes, driver, cuda; [] without nvidia-smi."""
    listing = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    if not listing:
        return []
    header = run(["nvidia-smi"]) or ""
    match = re.search(r"CUDA Version:\s*([0-9.]+)", header)
    gpus = []
    for line in listing.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            continue
        memory_mib = _int(fields[1])
        gpus.append({"name": fields[0], "memory_bytes": memory_mib * 1024 * 1024 if memory_mib else None,
                     "driver": fields[2], "cuda": match.group(1) if match else None})  # fmt: skip
    return gpus


# ---------------------------------------------------------------- software and model hashes


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def software_versions(run: RunCommand = run_command) -> dict[str, Any]:
    """A bundle's "software" block: conveyor's version and git commit, Python's, numpy's, onnxruntime's."""
    import numpy

    import conveyor

    commit, dirty = git_commit(Path(conveyor.__file__).parent, run)
    return {"conveyor_version": conveyor.__version__, "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "numpy": numpy.__version__,
            "onnxruntime": _package_version("onnxruntime")}  # fmt: skip


def git_commit(package_dir: Path, run: RunCommand = run_command) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the checkout the package runs from; (None, None) when installed."""
    if "site-packages" in package_dir.parts or "dist-packages" in package_dir.parts:
        return None, None
    commit = run(["git", "-C", str(package_dir), "rev-parse", "HEAD"])
    if not commit or not re.fullmatch(r"[0-9a-f]{40,64}", commit.strip()):
        return None, None
    status = run(["git", "-C", str(package_dir), "status", "--porcelain", "--untracked-files=no", "--", "."])
    return commit.strip(), None if status is None else bool(status.strip())


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str | None:
    """The SHA-256 of a file's bytes (hex), or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def config_sha256(config: Any) -> str:
    """SHA-256 of a model config's effective settings as canonical JSON: the same meaning, the same hash.

    `config` is a pydantic ModelConfig (its model_dump) or a plain mapping.
    """
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    text = json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value

