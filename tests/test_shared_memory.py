"""The shared-memory manager and the codecs' shared-memory parameters, in-process.

The manager maps files of a temporary directory standing for /dev/shm: every check on keys,
names, windows and sizes, the lifetime of a mapping under views, and what an unregistered
region refuses. tests/test_shared_memory_server.py drives the same over the wire.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

from conveyor.errors import Conflict, InvalidInput, NotFound
from conveyor.protocol.grpc import codec
from conveyor.protocol.grpc import inference_pb2 as pb
from conveyor.protocol.types import InferOutput, InferResponse, SharedMemoryRef
from conveyor.server.shared_memory import SharedMemoryManager


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    (tmp_path / "shm").mkdir()
    return tmp_path / "shm"


@pytest.fixture
def manager(directory: Path) -> SharedMemoryManager:
    manager = SharedMemoryManager(max_regions=3, directory=directory)
    yield manager
    manager.close()


def _object(directory: Path, name: str, content: bytes) -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def test_inputs_are_read_only_views_of_the_window_and_outputs_land_inside_it(
    manager: SharedMemoryManager, directory: Path
) -> None:
    values = np.arange(8, dtype=np.float32)
    path = _object(directory, "data", b"\xff" * 5000 + values.tobytes() + b"\0" * 100)
    manager.register_system("r", "/data", 5000 - 8, 8 + 32 + 100)  # the window starts off a page boundary
    assert manager.system_status() == [{"name": "r", "key": "/data", "offset": 4992, "byte_size": 140}]
    array = manager.read(SharedMemoryRef("r", 8, 32), "FP32", (2, 4), where="input 'x'")
    np.testing.assert_array_equal(array, values.reshape(2, 4))
    assert not array.flags.writeable
    target = manager.target(SharedMemoryRef("r", 40, 100), where="output 'y'")
    written = manager.write(target, np.array([[1, 2]], dtype=np.int64), "INT64", where="output 'y'")
    assert written == SharedMemoryRef("r", 40, 16)  # the bytes written, not the bytes offered
    content = path.read_bytes()
    assert content[5032:5048] == np.array([1, 2], np.int64).tobytes()  # window offset 4992 + 40
    assert content[:5032] == b"\xff" * 5000 + values.tobytes() and content[5048:] == b"\0" * 84  # nothing else


def test_bytes_tensors_travel_length_prefixed(manager: SharedMemoryManager, directory: Path) -> None:
    _object(directory, "text", b"\x02\0\0\0hi\x03\0\0\0you" + b"\0" * 32)
    manager.register_system("t", "text", 0, 45)
    assert manager.read(SharedMemoryRef("t", 0, 13), "BYTES", (2,), where="input 's'").tolist() == [b"hi", b"you"]
    with pytest.raises(InvalidInput, match="BYTES element 1 claims 3 bytes but only 1 remain"):
        manager.read(SharedMemoryRef("t", 0, 11), "BYTES", (2,), where="input 's'")
    written = manager.write(manager.target(SharedMemoryRef("t", 13, 32), where="o"),
                            np.array([b"ok"], dtype=object), "BYTES", where="o")
    assert written.byte_size == 6
    assert manager.read(SharedMemoryRef("t", 13, 6), "BYTES", (1,), where="o").tolist() == [b"ok"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("a/b", "is not a shared memory object name"),
        ("/../etc/passwd", "is not a shared memory object name"),
        ("..", "is not a shared memory object name"),
        ("a..b", "is not a shared memory object name"),
        (".", "is not a shared memory object name"),
        ("", "is not a shared memory object name"),
        ("/", "is not a shared memory object name"),
        ("//data", "is not a shared memory object name"),
        ("da\0ta", "is not a shared memory object name"),
        ("da\nta", "is not a shared memory object name"),
        ("é" * 128, "of at most 255 bytes"),
        ("sem.data", "names a POSIX semaphore, not a shared memory region"),
        (7, "'key' must be a string naming a POSIX shared memory object"),
        (None, "got null"),
        ("missing", "no shared memory object 'missing' exists"),
    ],
)
def test_keys_name_one_object_of_the_directory(manager: SharedMemoryManager, directory: Path, key: object,
                                               message: str) -> None:
    _object(directory, "data", b"\0" * 64)
    with pytest.raises(InvalidInput, match=message):
        manager.register_system("r", key, 0, 64)
    assert manager.system_status() == []


def test_links_and_special_files_are_refused(manager: SharedMemoryManager, directory: Path, tmp_path: Path) -> None:
    secret = _object(tmp_path, "secret", b"private" * 10)
    (directory / "link").symlink_to(secret)
    with pytest.raises(InvalidInput, match="cannot open shared memory object '/link': it is a symbolic link"):
        manager.register_system("r", "/link", 0, 8)
    os.mkfifo(directory / "fifo")
    with pytest.raises(InvalidInput, match="'fifo' is not a shared memory object"):
        manager.register_system("r", "fifo", 0, 8)
    (directory / "folder").mkdir()
    with pytest.raises(InvalidInput, match="cannot open shared memory object 'folder'"):
        manager.register_system("r", "folder", 0, 8)
    assert secret.read_bytes() == b"private" * 10


@pytest.mark.parametrize(
    ("offset", "byte_size", "message"),
    [
        (0, 65, "offset 0 \\+ byte_size 65 = 65 bytes, but shared memory object 'data' holds 64"),
        (60, 8, "= 68 bytes, but shared memory object 'data' holds 64"),
        (2**64, 1, "holds 64"),
        (-1, 8, "'offset' must be an integer >= 0, got -1"),
        (0, 0, "'byte_size' must be an integer > 0, got 0"),
        (0, -8, "'byte_size' must be an integer > 0"),
        (True, 8, "'offset' must be an integer >= 0, got true"),
        (0, 8.0, "'byte_size' must be an integer > 0, got 8.0"),
        (0, None, "got null"),
    ],
)
def test_the_window_must_lie_inside_the_object(manager: SharedMemoryManager, directory: Path, offset: object,
                                               byte_size: object, message: str) -> None:
    _object(directory, "data", b"\0" * 64)
    with pytest.raises(InvalidInput, match=message):
        manager.register_system("r", "data", offset, byte_size)


@pytest.mark.parametrize("name", ["", "a/b", "x\0y", "tab\there", "n" * 257, 5])
def test_region_names_are_checked(manager: SharedMemoryManager, directory: Path, name: object) -> None:
    _object(directory, "data", b"\0" * 64)
    with pytest.raises(InvalidInput, match="is not valid: use 1 to 256 printable characters without '/'"):
        manager.register_system(name, "data", 0, 64)


def test_every_access_stays_inside_the_registered_window(manager: SharedMemoryManager, directory: Path) -> None:
    _object(directory, "data", b"\0" * 4096)
    manager.register_system("r", "data", 1024, 64)
    with pytest.raises(InvalidInput, match="64 bytes at offset 8 of shared memory region 'r' end at byte 72, past"):
        manager.read(SharedMemoryRef("r", 8, 64), "UINT8", (64,), where="input 'x'")
    with pytest.raises(InvalidInput, match="input 'x': no shared memory region 'other' is registered"):
        manager.read(SharedMemoryRef("other", 0, 4), "UINT8", (4,), where="input 'x'")
    with pytest.raises(InvalidInput, match="output 'y': 16 bytes at offset 60"):
        manager.target(SharedMemoryRef("r", 60, 16), where="output 'y'")
    target = manager.target(SharedMemoryRef("r", 0, 8), where="output 'y'")
    with pytest.raises(InvalidInput, match="the output takes 16 bytes but shared_memory_byte_size gives 8"):
        manager.write(target, np.zeros(2, np.int64), "INT64", where="output 'y'")
    with pytest.raises(InvalidInput, match="needs 4 bytes of FP32 data"):
        manager.read(SharedMemoryRef("r", 0, 8), "FP32", (1,), where="input 'x'")
    assert (directory / "data").read_bytes() == b"\0" * 4096


def test_a_file_shrunk_under_a_region_is_refused_not_read(manager: SharedMemoryManager, directory: Path) -> None:
    path = _object(directory, "data", b"\1" * 8192)
    manager.register_system("r", "data", 4096, 64)
    os.truncate(path, 4000)  # reading the mapping now would fault (SIGBUS)
    with pytest.raises(InvalidInput, match="has shrunk to 4000 bytes since it was registered"):
        manager.read(SharedMemoryRef("r", 0, 64), "UINT8", (64,), where="input 'x'")
    target_error = "unregister the region and register it again"
    with pytest.raises(InvalidInput, match=target_error):
        manager.target(SharedMemoryRef("r", 0, 64), where="output 'y'")


def test_duplicates_limits_and_reuse(manager: SharedMemoryManager, directory: Path) -> None:
    _object(directory, "data", b"\0" * 64)
    manager.register_system("a", "data", 0, 64)
    with pytest.raises(Conflict, match="shared memory region 'a' is already registered"):
        manager.register_system("a", "data", 0, 8)
    manager.register_system("b", "data", 0, 64)  # one object under two names, as Triton allows
    manager.register_system("c", "data", 8, 8)
    with pytest.raises(InvalidInput, match="holds 3 shared memory regions, its limit"):
        manager.register_system("d", "data", 0, 8)
    manager.unregister_system("a")
    manager.unregister_system("a")  # not registered: nothing to do, no error (as Triton)
    manager.register_system("a", "data", 0, 32)  # the name is free again
    assert [row["name"] for row in manager.system_status()] == ["b", "c", "a"]
    assert manager.system_status("a") == [{"name": "a", "key": "data", "offset": 0, "byte_size": 32}]
    with pytest.raises(NotFound, match="no system shared memory region 'd' is registered"):
        manager.system_status("d")
    manager.unregister_system()
    assert manager.system_status() == []


def test_a_mapping_outlives_unregistering_while_a_view_reads_it(manager: SharedMemoryManager,
                                                                  directory: Path) -> None:
    """An input waiting in a batcher is a view of the mapping: unregistering cannot unmap it from
    under the view, and it is unmapped once the view is released."""
    _object(directory, "data", np.arange(16, dtype=np.uint8).tobytes())
    manager.register_system("r", "data", 0, 16)
    mapping = weakref.ref(manager._regions["r"].mapping)
    view = manager.read(SharedMemoryRef("r", 4, 4), "UINT8", (4,), where="input 'x'")
    target = manager.target(SharedMemoryRef("r", 0, 4), where="output 'y'")
    manager.unregister_system("r")
    assert view.tolist() == [4, 5, 6, 7]  # still mapped: reading it is safe
    with pytest.raises(InvalidInput, match="region 'r' was unregistered while the request ran; the output was not"):
        manager.write(target, np.ones(4, np.uint8), "UINT8", where="output 'y'")
    manager.register_system("r", "data", 0, 16)  # the same name again is another region
    with pytest.raises(InvalidInput, match="was unregistered while the request ran"):
        manager.write(target, np.ones(4, np.uint8), "UINT8", where="output 'y'")
    assert (directory / "data").read_bytes() == np.arange(16, dtype=np.uint8).tobytes()
    del view, target
    gc.collect()
    assert mapping() is None or mapping().closed


def test_cuda_regions_are_refused_with_the_way_out(manager: SharedMemoryManager) -> None:
    with pytest.raises(InvalidInput, match="CUDA shared memory region 'g' cannot be registered: .*; use system "
                                           "shared memory instead"):
        manager.register_cuda("g")
    assert manager.cuda_status() == []
    with pytest.raises(NotFound, match="no CUDA shared memory region 'g' is registered"):
        manager.cuda_status("g")
    manager.unregister_cuda("g")
    with pytest.raises(InvalidInput, match="is not valid"):
        manager.unregister_cuda("a/b")


# -- the gRPC codec ----------------------------------------------------------------------


def _tensor(request: pb.ModelInferRequest, name: str, region: str | None = None, byte_size: int = 16,
            datatype: str = "FP32") -> pb.ModelInferRequest.InferInputTensor:
    tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, 4])
    if region is not None:
        tensor.parameters["shared_memory_region"].string_param = region
        tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
        tensor.parameters["shared_memory_offset"].int64_param = 32
    return tensor


def test_grpc_raw_contents_belong_to_the_inputs_outside_shared_memory() -> None:
    request = pb.ModelInferRequest(model_name="m")
    _tensor(request, "a")
    _tensor(request, "s", region="in")
    _tensor(request, "b")
    output = request.outputs.add(name="y")
    output.parameters["shared_memory_region"].string_param = "out"
    output.parameters["shared_memory_byte_size"].int64_param = 64
    a, b = np.ones((1, 4), np.float32), np.full((1, 4), 2, np.float32)
    request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    decoded = codec.infer_request_from_proto(request)
    np.testing.assert_array_equal(decoded.inputs[0].data, a)
    np.testing.assert_array_equal(decoded.inputs[2].data, b)
    assert decoded.inputs[1].data is None and decoded.inputs[1].shared_memory == SharedMemoryRef("in", 32, 16)
    assert decoded.inputs[1].parameters == {}
    assert decoded.outputs[0].shared_memory == SharedMemoryRef("out", 0, 64)
    request.raw_input_contents.append(b.tobytes())
    with pytest.raises(InvalidInput, match="raw_input_contents has 3 entries for 2 inputs outside shared memory"):
        codec.infer_request_from_proto(request)
    del request.raw_input_contents[1:]
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs outside shared memory"):
        codec.infer_request_from_proto(request)


def test_grpc_shared_memory_inputs_are_checked() -> None:
    request = pb.ModelInferRequest(model_name="m")
    _tensor(request, "s", region="in").contents.fp32_contents.extend([1, 2, 3, 4])
    with pytest.raises(InvalidInput, match="input 's' has both shared memory parameters and 'contents'"):
        codec.infer_request_from_proto(request)
    for tensor_args, message in (
        (dict(byte_size=12), "shared_memory_byte_size is 12 but shape \\[1, 4\\] needs 16 bytes of FP32 data"),
        (dict(datatype="FP33"), "unknown datatype 'FP33'"),
        (dict(region=""), "'shared_memory_region' must be a region's name"),
    ):
        request = pb.ModelInferRequest(model_name="m")
        _tensor(request, "s", **{"region": "in", **tensor_args})
        with pytest.raises(InvalidInput, match=message):
            codec.infer_request_from_proto(request)
    request = pb.ModelInferRequest(model_name="m")
    output = request.outputs.add(name="y")
    output.parameters["shared_memory_region"].string_param = "out"
    output.parameters["shared_memory_byte_size"].int64_param = 64
    output.parameters["classification"].int64_param = 3
    with pytest.raises(InvalidInput, match="a classification output cannot be written to shared memory"):
        codec.infer_request_from_proto(request)


def test_grpc_outputs_in_shared_memory_keep_their_raw_entry_empty() -> None:
    written = InferOutput("y", "FP32", (1, 2), np.ones((1, 2), np.float32), shared_memory=SharedMemoryRef("o", 0, 8))
    plain = InferOutput("z", "INT8", (1,), np.array([3], np.int8))
    message = codec.infer_response_to_proto(InferResponse("m", "1", "id", [written, plain]))
    assert list(message.raw_output_contents) == [b"", b"\x03"]
    assert [(o.name, list(o.shape), dict(o.parameters)) for o in message.outputs] == [("y", [1, 2], {}),
                                                                                      ("z", [1], {})]
