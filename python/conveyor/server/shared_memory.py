"""Triton's shared-memory extension: regions clients register, tensors read from and written to them.

A client creates a POSIX shared-memory object (`/dev/shm/<key>`: shm_open, Python's
multiprocessing.shared_memory and tritonclient.utils.shared_memory all make one) and
registers a window of it, `offset` and `byte_size`, under a region name. An input that names
the region is a numpy view of the mapped window (the batcher copies it into the batch, as any
input); an output that names it is written into it, and its answer carries metadata only. The
tensor bytes never travel through the socket.

A client must never make the server read or write memory it did not register (Triton's
CVE-2025-23319, -23320 and -23334 were such checks missing), so:
- a key names one object directly in /dev/shm: no '/' past a leading one, no '..', NUL or
  control character, at most 255 bytes, no POSIX semaphore (`sem.*`). It is opened with
  O_NOFOLLOW (a symbolic link there could point at any file of the server's user) and must be
  a regular file that holds offset + byte_size bytes;
- only the registered window is mapped, and a tensor's offset and size must fall inside it;
- the file must still hold the window at each access: reading a mapping past the end of a file
  shrunk under it faults (SIGBUS) instead of failing the request. A process that can write
  the file can still shrink it between that check and the copy: SECURITY.md says so.

Lifetime: unregistering removes a region at once (its name may be registered again) and unmaps
it once nothing reads it. An input still waiting in a batcher is a view of the mapping, and
Python's mmap refuses to close under a view, so the mapping lives until the batcher has copied
the input: no access ever touches unmapped memory. Outputs are written only into a region
registered at that moment: the check and the copy hold the lock that unregistering takes, so
after an unregister the server writes nothing more into that memory.

Registration, status and unregistration are control operations: the front ends guard them
with the API key like the repository routes.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.errors import Conflict, InvalidInput, NotFound
from conveyor.memory import cuda_built, cuda_device_count
from conveyor.protocol.binary import array_from_raw, raw_view, serialize_bytes
from conveyor.protocol.request_fields import describe
from conveyor.protocol.types import SharedMemoryRef

SHM_DIRECTORY = Path("/dev/shm")
DEFAULT_MAX_REGIONS = 256  # `conveyor serve --max-shared-memory-regions`
MAX_NAME_CHARACTERS = 256  # a region name
MAX_KEY_BYTES = 255  # a file name in /dev/shm (NAME_MAX)

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_REGISTER_HELP = "POST /v2/systemsharedmemory/region/<name>/register, or tritonclient's register_system_shared_memory"


class _Region:
    """One registered system shared-memory window, mapped read-write.

    `mapping` covers the window from the page boundary at or below `offset`; `start` is where
    the window begins inside it."""

    __slots__ = ("name", "key", "offset", "byte_size", "mapping", "start")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap, start: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self.mapping, self.start = mapping, start

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def span(self, ref: SharedMemoryRef, size: int, where: str) -> slice:
        """The bytes of the mapping that hold `size` bytes at `ref.offset` of the window.

        Precondition: the manager's lock is held (the region is not closed meanwhile)."""
        if ref.offset + size > self.byte_size:
            raise InvalidInput(
                f"{where}: {size} bytes at offset {ref.offset} of shared memory region '{self.name}' end at byte "
                f"{ref.offset + size}, past the {self.byte_size} bytes registered; send a smaller offset or size, "
                "or register a larger region"
            )
        # A file shrunk under the mapping would fault on access: refuse instead.
        if self.mapping.size() < self.offset + self.byte_size:
            raise InvalidInput(
                f"{where}: the shared memory object '{self.key}' of region '{self.name}' has shrunk to "
                f"{self.mapping.size()} bytes since it was registered (offset {self.offset} + {self.byte_size} "
                "bytes); unregister the region and register it again"
            )
        begin = self.start + ref.offset
        return slice(begin, begin + size)

    def close(self) -> None:
        """Unmap now unless a view (an input not yet copied) still reads it: it then unmaps when the
        last view is released."""
        try:
            self.mapping.close()
        except BufferError:
            pass


class OutputTarget:
    """A requested output's place, resolved before the model runs (see SharedMemoryManager.target)."""

    __slots__ = ("ref", "region")

    def __init__(self, ref: SharedMemoryRef, region: _Region) -> None:
        self.ref, self.region = ref, region


class SharedMemoryManager:
    """The registered regions of one server; safe to call from any thread."""

    def __init__(self, max_regions: int = DEFAULT_MAX_REGIONS, directory: Path = SHM_DIRECTORY) -> None:
        self.max_regions = max_regions
        self.directory = directory
        self._lock = threading.Lock()
        self._regions: dict[str, _Region] = {}

    # -- control ---------------------------------------------------------------------------

    def register_system(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        """Map `byte_size` bytes at `offset` of the POSIX shared-memory object `key` as region `name`."""
        where = f"system shared memory region '{name}'"
        check_region_name(name)
        file_name = _check_key(key, where)
        if type(offset) is not int or offset < 0:
            raise InvalidInput(f"{where}: 'offset' must be an integer >= 0, got {describe(offset)}")
        if type(byte_size) is not int or byte_size <= 0:
            raise InvalidInput(f"{where}: 'byte_size' must be an integer > 0, got {describe(byte_size)}")
        with self._lock:  # mapping takes a few system calls on a memory file system
            self._check_room(name)
            self._regions[name] = self._map(name, key, file_name, offset, byte_size, where)

    def _check_room(self, name: str) -> None:
        """Precondition: the lock is held."""
        if name in self._regions:
            raise Conflict(f"shared memory region '{name}' is already registered; unregister it first, or pick "
                           "another name")
        if len(self._regions) >= self.max_regions:
            raise InvalidInput(
                f"the server holds {len(self._regions)} shared memory regions, its limit "
                "(--max-shared-memory-regions): unregister regions no longer used first"
            )

    def _map(self, name: str, key: str, file_name: str, offset: int, byte_size: int, where: str) -> _Region:
        path = self.directory / file_name
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise InvalidInput(f"{where}: no shared memory object '{key}' exists ({path} is missing); create it "
                               "first (shm_open, or tritonclient's create_shared_memory_region)") from None
        except OSError as exc:
            reason = "it is a symbolic link" if os.path.islink(path) else exc.strerror
            raise InvalidInput(f"{where}: cannot open shared memory object '{key}': {reason}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"{where}: '{key}' is not a shared memory object (not a regular file)")
            if info.st_size < offset + byte_size:
                raise InvalidInput(
                    f"{where}: offset {offset} + byte_size {byte_size} = {offset + byte_size} bytes, but shared "
                    f"memory object '{key}' holds {info.st_size}; register a window inside it"
                )
            page_start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(fd, offset + byte_size - page_start, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=page_start)
        except OSError as exc:
            raise InvalidInput(f"{where}: cannot map shared memory object '{key}': {exc.strerror}") from None
        finally:
            os.close(fd)  # the mapping keeps its own descriptor
        return _Region(name, key, offset, byte_size, mapping, offset - page_start)

    def unregister_system(self, name: str = "") -> None:
        """Unregister region `name`, or every region when `name` is "". A name not registered is no
        error (Triton answers the same): clients unregister on cleanup whatever they may have left."""
        if name:
            check_region_name(name)
        with self._lock:
            names = [name] if name else list(self._regions)
            for gone in names:
                region = self._regions.pop(gone, None)
                if region is not None:
                    region.close()

    def system_status(self, name: str = "") -> list[dict[str, Any]]:
        """[{name, key, offset, byte_size}] of region `name`, or of every region when `name` is ""."""
        with self._lock:
            if not name:
                return [region.status() for region in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            check_region_name(name)
            raise NotFound(f"no system shared memory region '{name}' is registered")
        return [region.status()]

    def cuda_status(self, name: str = "") -> list[dict[str, Any]]:
        """CUDA regions are never registered here: an empty list, or NotFound for a name."""
        if name:
            check_region_name(name)
            raise NotFound(f"no CUDA shared memory region '{name}' is registered (this server registers none)")
        return []

    def unregister_cuda(self, name: str = "") -> None:
        """No CUDA region is ever registered here, so there is nothing to unregister (as for any
        name not registered); a name is still checked."""
        if name:
            check_region_name(name)

    def register_cuda(self, name: str) -> None:
        """Always refuses, saying why: this server maps system shared memory only."""
        check_region_name(name)
        if not cuda_built():
            reason = "this build of Conveyor has no CUDA support"
        elif cuda_device_count() == 0:
            reason = "no CUDA device is present"
        else:
            reason = "this server maps system shared memory only"
        raise InvalidInput(f"CUDA shared memory region '{name}' cannot be registered: {reason}; use system shared "
                           f"memory instead ({_REGISTER_HELP})")

    def close(self) -> None:
        """Unregister every region (the server stops)."""
        self.unregister_system()

    # -- tensors ---------------------------------------------------------------------------

    def read(self, ref: SharedMemoryRef, datatype: str, shape: Sequence[int], *, where: str) -> np.ndarray:
        """The input at `ref`, shaped: a read-only view of the region (BYTES: its elements, copied)."""
        with self._lock:
            region = self._region(ref, where)
            span = region.span(ref, ref.byte_size, where)
            window = memoryview(region.mapping).toreadonly()[span]
        return array_from_raw(window, datatype, shape, where=where)

    def target(self, ref: SharedMemoryRef, *, where: str) -> OutputTarget:
        """Where an output goes, checked before the model runs: a registered region, a window inside it."""
        with self._lock:
            region = self._region(ref, where)
            region.span(ref, ref.byte_size, where)
        return OutputTarget(ref, region)

    def write(self, target: OutputTarget, array: np.ndarray, datatype: str, *, where: str) -> SharedMemoryRef:
        """Write an output into its region; returns its place with the byte size written."""
        payload = serialize_bytes(array, where=where) if datatype == "BYTES" else raw_view(array, datatype, where=where)
        size = len(payload) if isinstance(payload, bytes) else payload.nbytes
        ref, region = target.ref, target.region
        if size > ref.byte_size:
            raise InvalidInput(
                f"{where}: the output takes {size} bytes but shared_memory_byte_size gives {ref.byte_size}; ask "
                f"for at least {size} bytes of the region"
            )
        with self._lock:
            if self._regions.get(region.name) is not region:
                raise InvalidInput(
                    f"{where}: shared memory region '{region.name}' was unregistered while the request ran; the "
                    "output was not written"
                )
            region.mapping[region.span(ref, size, where)] = payload
        return SharedMemoryRef(ref.region, ref.offset, size)

    def _region(self, ref: SharedMemoryRef, where: str) -> _Region:
        """Precondition: the lock is held."""
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidInput(f"{where}: no shared memory region '{ref.region}' is registered; register it first "
                               f"({_REGISTER_HELP})")
        return region


def check_region_name(name: Any) -> None:
    """Raise InvalidInput unless `name` can name a region: 1 to 256 characters, no '/' (it is one
    segment of a URL path) and no control character."""
    if (
        type(name) is not str
        or not 0 < len(name) <= MAX_NAME_CHARACTERS
        or "/" in name
        or not name.isprintable()
    ):
        raise InvalidInput(
            f"shared memory region name {describe(name)} is not valid: use 1 to {MAX_NAME_CHARACTERS} printable "
            "characters without '/'"
        )


def _check_key(key: Any, where: str) -> str:
    """The file name in /dev/shm of the POSIX shared-memory object `key` ("/name" or "name")."""
    if type(key) is not str:
        raise InvalidInput(f"{where}: 'key' must be a string naming a POSIX shared memory object, such as "
                           f"'/my_region', got {describe(key)}")
    file_name = key[1:] if key.startswith("/") else key
    if (
        not file_name
        or len(file_name.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES
        or "/" in file_name
        or ".." in file_name
        or file_name == "."
        or not file_name.isprintable()
    ):
        raise InvalidInput(
            f"{where}: key {describe(key)} is not a shared memory object name: use one name (a leading '/' "
            f"allowed) of at most {MAX_KEY_BYTES} bytes, without '/', '..' or control characters"
        )
    if file_name.startswith("sem."):
        raise InvalidInput(f"{where}: key {describe(key)} names a POSIX semaphore, not a shared memory region")
    return file_name
