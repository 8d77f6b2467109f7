// conveyor._core.MemoryPool and Block: argument conversion and zero-copy numpy arrays
// over pooled blocks. conveyor/memory.py is the public face (it adds CuPy arrays for
// CUDA pools).
//
// empty() is the hot call, so it skips pybind11's dispatcher: it is a plain CPython
// METH_FASTCALL method, numpy dtypes are cached per spelling, and the array is made
// directly over the block with a capsule as its base (no copy, no Python-level wrapper).
#include <pybind11/stl.h>

#include <string>

#include "conveyor/memory_pool.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

constexpr int kMaxDims = 64;               // NPY_MAXDIMS of numpy 2; numpy 1 rejects > 32 itself
constexpr uint64_t kDescrHasObject = 0x01;  // NPY_ITEM_HASOBJECT: the dtype holds PyObject pointers
constexpr int kArrayFlags = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ |
                            py::detail::npy_api::NPY_ARRAY_ALIGNED_ |
                            py::detail::npy_api::NPY_ARRAY_WRITEABLE_;

std::string label(const MemoryPool& pool) {
  const Device device = pool.device();
  switch (device.kind) {
    case DeviceKind::kCPU: return "cpu";
    case DeviceKind::kCUDAHost: return "cuda_host";
    case DeviceKind::kCUDA: break;
  }
  return "cuda:" + std::to_string(device.index);
}

std::string repr_of(py::handle obj) { return py::repr(obj).cast<std::string>(); }

[[noreturn]] void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidInput, "[memory] " + message);
}

// ---- constructor arguments -----------------------------------------------------------
struct DeviceSpec {
  MemoryKind kind;
  int index;
};

DeviceSpec parse_device(py::handle device) {
  const char* expected = "device must be 'cpu', 'cuda_host', 'cuda' or 'cuda:N'";
  if (!py::isinstance<py::str>(device)) invalid(std::string(expected) + ", got " + repr_of(device));
  const std::string text = device.cast<std::string>();
  if (text == "cpu") return {MemoryKind::kHost, 0};
  if (text == "cuda_host") return {MemoryKind::kPinnedHost, 0};
  if (text == "cuda") return {MemoryKind::kCuda, 0};
  if (text.rfind("cuda:", 0) == 0 && text.size() > 5 && text.size() <= 9 &&
      text.find_first_not_of("0123456789", 5) == std::string::npos) {
    return {MemoryKind::kCuda, std::stoi(text.substr(5))};
  }
  invalid(std::string(expected) + ", got " + repr_of(device));
}

uint64_t parse_limit(py::handle limit) {
  if (limit.is_none()) return 0;
  if (!PyLong_Check(limit.ptr()) || PyBool_Check(limit.ptr())) {
    invalid("limit_bytes must be an int or None, got " + repr_of(limit));
  }
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(limit.ptr(), &overflow);
  if (overflow < 0 || (overflow == 0 && value < 0)) {
    invalid("limit_bytes must be >= 0 (0 or None: no limit), got " + repr_of(limit));
  }
  if (overflow > 0) invalid("limit_bytes must fit in 63 bits, got " + repr_of(limit));
  return static_cast<uint64_t>(value);
}

// ---- empty(): shape and dtype --------------------------------------------------------
Py_ssize_t parse_dim(PyObject* item, PyObject* shape) {
  const Py_ssize_t dim = PyIndex_Check(item) ? PyNumber_AsSsize_t(item, PyExc_OverflowError) : -1;
  if (dim == -1 && (PyErr_Occurred() || !PyIndex_Check(item))) {
    PyErr_Clear();
    invalid("shape must be an int or a sequence of ints, got " + repr_of(shape));
  }
  if (dim < 0) invalid("shape must not have negative dimensions, got " + repr_of(shape));
  return dim;
}

// Fills dims from an int or a sequence of ints; returns ndim.
int parse_shape(PyObject* shape, Py_ssize_t (&dims)[kMaxDims]) {
  if (PyLong_Check(shape)) {
    dims[0] = parse_dim(shape, shape);
    return 1;
  }
  py::object sequence;
  if (PyTuple_Check(shape) || PyList_Check(shape)) {
    sequence = py::reinterpret_borrow<py::object>(shape);
  } else if (PyIndex_Check(shape)) {  // numpy integer scalars
    dims[0] = parse_dim(shape, shape);
    return 1;
  } else if (PySequence_Check(shape) && !PyUnicode_Check(shape) && !PyBytes_Check(shape)) {
    sequence = py::reinterpret_steal<py::object>(PySequence_Tuple(shape));
    if (!sequence) throw py::error_already_set();
  } else {
    invalid("shape must be an int or a sequence of ints, got " + repr_of(shape));
  }
  const Py_ssize_t ndim = PySequence_Fast_GET_SIZE(sequence.ptr());
  if (ndim > kMaxDims) {
    invalid("shape has " + std::to_string(ndim) + " dimensions, at most " + std::to_string(kMaxDims));
  }
  PyObject** items = PySequence_Fast_ITEMS(sequence.ptr());
  for (Py_ssize_t i = 0; i < ndim; ++i) dims[i] = parse_dim(items[i], shape);
  return static_cast<int>(ndim);
}

// np.dtype(spec) for one spelling of a dtype, validated; type objects and strings are
// cached (np.float32, "float32", float), dtype instances are used as they are.
// Called with the GIL held, which also guards the cache.
py::object resolve_dtype(PyObject* spec) {
  auto& api = py::detail::npy_api::get();
  if (api.PyArrayDescr_Check_(spec)) {
    auto descr = py::reinterpret_borrow<py::dtype>(spec);
    if ((descr.flags() & kDescrHasObject) == 0 && descr.itemsize() > 0) return descr;
  }
  static auto* cache = new py::dict();  // never destroyed: lives with the interpreter
  const bool cacheable = PyUnicode_CheckExact(spec) || PyType_Check(spec);
  if (cacheable) {
    if (PyObject* hit = PyDict_GetItemWithError(cache->ptr(), spec)) return py::reinterpret_borrow<py::object>(hit);
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  PyObject* converted = nullptr;
  if (!api.PyArray_DescrConverter_(spec, &converted) || !converted) {
    std::string why = py::error_already_set().what();
    invalid("dtype " + repr_of(spec) + " is not a numpy dtype (" + why + ")");
  }
  auto descr = py::reinterpret_steal<py::dtype>(converted);
  if (descr.flags() & kDescrHasObject) {
    invalid("dtype " + repr_of(descr) + " holds Python objects, which pooled memory cannot: use a numeric dtype");
  }
  if (descr.itemsize() == 0) invalid("dtype " + repr_of(descr) + " has no size: give one, e.g. 'S16'");
  if (cacheable) {
    if (PyDict_Size(cache->ptr()) >= 1024) PyDict_Clear(cache->ptr());  // bounded: specs are few in practice
    (*cache)[py::handle(spec)] = descr;
  }
  return descr;
}

struct ArrayRequest {
  py::object descr;
  Py_ssize_t dims[kMaxDims];
  int ndim = 0;
  size_t nbytes = 0;
};

ArrayRequest parse_request(PyObject* shape, PyObject* dtype) {
  ArrayRequest request;
  request.descr = resolve_dtype(dtype);
  request.ndim = parse_shape(shape, request.dims);
  size_t nbytes = static_cast<size_t>(py::reinterpret_borrow<py::dtype>(request.descr).itemsize());
  for (int i = 0; i < request.ndim; ++i) {
    if (__builtin_mul_overflow(nbytes, static_cast<size_t>(request.dims[i]), &nbytes) ||
        nbytes > static_cast<size_t>(PY_SSIZE_T_MAX)) {
      invalid("shape " + repr_of(shape) + " of dtype " + repr_of(request.descr) + " is too large to address");
    }
  }
  request.nbytes = nbytes;
  return request;
}

void release_owner(PyObject* capsule) {
  delete static_cast<std::shared_ptr<void>*>(PyCapsule_GetPointer(capsule, "conveyor.owner"));
}

// A capsule owning the block: the base of every array over it. Same layout as the owner
// capsules bind_tensor makes (a heap shared_ptr<void> named "conveyor.owner").
py::object owner_capsule(std::shared_ptr<Block> block) {
  auto* holder = new std::shared_ptr<void>(std::move(block));
  PyObject* capsule = PyCapsule_New(holder, "conveyor.owner", release_owner);
  if (!capsule) {
    delete holder;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

// Allocates with the GIL held for host memory (a free-list pop, or an mmap that touches no
// page) and released for CUDA memory (cudaMalloc and cudaHostAlloc may synchronise).
std::shared_ptr<Block> allocate_block(MemoryPool& pool, size_t nbytes) {
  if (pool.kind() == MemoryKind::kHost) return pool.allocate(nbytes);
  py::gil_scoped_release released;
  return pool.allocate(nbytes);
}

py::object empty_array(MemoryPool& pool, PyObject* shape, PyObject* dtype) {
  if (pool.kind() == MemoryKind::kCuda) {
    invalid("empty() over '" + label(pool) + "' memory makes a CuPy array: use conveyor.MemoryPool");
  }
  ArrayRequest request = parse_request(shape, dtype);
  std::shared_ptr<Block> block = allocate_block(pool, request.nbytes);
  void* data = block->data;
  py::object base = owner_capsule(std::move(block));
  auto& api = py::detail::npy_api::get();
  PyObject* array = api.PyArray_NewFromDescr_(api.PyArray_Type_, request.descr.inc_ref().ptr(),
                                              request.ndim, request.dims, nullptr, data, kArrayFlags,
                                              nullptr);
  if (!array) throw py::error_already_set();
  // Steals the capsule's reference, also on failure.
  if (api.PyArray_SetBaseObject_(array, base.release().ptr()) < 0) {
    Py_DECREF(array);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(array);
}

// Sets the Python error for the exception being handled (we are outside pybind11's
// dispatcher, which would otherwise do this).
void set_python_error() {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const Error& e) {
    py::object exception = make_exception(e.code(), e.what());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exception.ptr())), exception.ptr());
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

// MemoryPool.empty(shape, dtype=float) as a METH_FASTCALL | METH_KEYWORDS method.
PyObject* pool_empty(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    PyObject* shape = nargs > 0 ? args[0] : nullptr;
    PyObject* dtype = nargs > 1 ? args[1] : nullptr;
    if (nargs > 2) invalid("empty() takes shape and dtype, got " + std::to_string(nargs) + " positional arguments");
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; ++i) {
      PyObject* name = PyTuple_GET_ITEM(kwnames, i);
      PyObject** slot = nullptr;
      if (PyUnicode_CompareWithASCIIString(name, "shape") == 0) slot = &shape;
      if (PyUnicode_CompareWithASCIIString(name, "dtype") == 0) slot = &dtype;
      if (!slot || *slot) invalid("empty() got an unexpected or repeated argument " + repr_of(name));
      *slot = args[nargs + i];
    }
    if (!shape) invalid("empty() needs a shape");
    auto& pool = py::handle(self).cast<MemoryPool&>();
    return empty_array(pool, shape, dtype ? dtype : Py_None).release().ptr();
  } catch (...) {
    set_python_error();
    return nullptr;
  }
}

constexpr const char* kEmptyDoc =
    "empty(shape, dtype=float)\n--\n\n"
    "An uninitialised numpy array over a pooled block, without a copy. shape is an int or a\n"
    "sequence of ints; dtype anything numpy.dtype accepts, except dtypes holding objects.\n"
    "The block returns to the pool when the array and every view of it are gone.";

PyMethodDef kEmptyMethod = {"empty", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pool_empty)),
                            METH_FASTCALL | METH_KEYWORDS, kEmptyDoc};

py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["bytes_in_use"] = s.bytes_in_use;
  d["bytes_reserved"] = s.bytes_reserved;
  d["peak_bytes_in_use"] = s.peak_bytes_in_use;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["upstream_allocs"] = s.upstream_allocs;
  d["upstream_frees"] = s.upstream_frees;
  d["limit_bytes"] = s.limit_bytes;
  return d;
}

void bind_block(py::module_& m) {
  py::class_<Block, std::shared_ptr<Block>>(
      m, "Block",
      "A raw pooled allocation; it returns to its pool when the last reference is gone.\n"
      "Used as the owner of arrays over device memory (e.g. CuPy's UnownedMemory).")
      .def_property_readonly("ptr", [](const Block& b) { return reinterpret_cast<uintptr_t>(b.data); },
                             "The address of the first byte.")
      .def_property_readonly("size", [](const Block& b) { return b.size; },
                             "Usable bytes: the size class, at least the bytes requested.")
      .def("__repr__", [](const Block& b) {
        return "<conveyor Block of " + std::to_string(b.size) + " bytes>";
      });
}

}  // namespace

void init_memory(py::module_& m) {
  bind_block(m);
  py::class_<MemoryPool, std::shared_ptr<MemoryPool>> pool(
      m, "MemoryPool",
      "A size-class caching allocator for one device (private; use conveyor.MemoryPool).");
  pool.def(py::init([](py::object device, py::object limit_bytes) {
             const DeviceSpec spec = parse_device(device);
             const uint64_t limit = parse_limit(limit_bytes);
             return MemoryPool::create(spec.kind, spec.index, limit);
           }),
           py::arg("device") = "cpu", py::arg("limit_bytes") = py::none(),
           "device: 'cpu', 'cuda_host' (pinned host memory) or 'cuda[:N]'; limit_bytes: a cap on "
           "reserved bytes (None or 0: no limit).")
      .def("allocate",
           [](MemoryPool& self, py::object nbytes) {
             const Py_ssize_t n = PyIndex_Check(nbytes.ptr()) ? PyNumber_AsSsize_t(nbytes.ptr(), nullptr) : -1;
             if (n < 0) {
               PyErr_Clear();
               invalid("nbytes must be an int >= 0, got " + repr_of(nbytes));
             }
             return allocate_block(self, static_cast<size_t>(n));
           },
           py::arg("nbytes"), "A raw block of at least nbytes.")
      .def("_block_for",
           [](MemoryPool& self, py::handle shape, py::handle dtype) {
             ArrayRequest request = parse_request(shape.ptr(), dtype.ptr());
             py::tuple dims(request.ndim);
             for (int i = 0; i < request.ndim; ++i) dims[i] = py::int_(request.dims[i]);
             return py::make_tuple(allocate_block(self, request.nbytes), dims, request.descr);
           },
           py::arg("shape"), py::arg("dtype") = py::none(),
           "(block, shape tuple, numpy dtype) for an array of that shape: validation shared with empty().")
      .def("stats", [](const MemoryPool& self) { return stats_dict(self.stats()); },
           "Counters: bytes_in_use, bytes_reserved, peak_bytes_in_use, hits, misses, upstream_allocs, "
           "upstream_frees, limit_bytes (0: no limit).")
      .def("trim", &MemoryPool::trim, "Releases every cached block upstream; returns the bytes released.")
      .def("reset_peak", &MemoryPool::reset_peak, "Starts peak_bytes_in_use again from bytes_in_use.")
      .def_property_readonly("device", [](const MemoryPool& self) { return label(self); },
                             "'cpu', 'cuda_host' or 'cuda:N'.")
      .def_property_readonly("limit_bytes",
                             [](const MemoryPool& self) -> py::object {
                               const uint64_t limit = self.stats().limit_bytes;
                               return limit ? py::object(py::int_(limit)) : py::object(py::none());
                             },
                             "The cap on reserved bytes, or None.");
  py::object empty = py::reinterpret_steal<py::object>(
      PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(pool.ptr()), &kEmptyMethod));
  if (!empty) throw py::error_already_set();
  pool.attr("empty") = empty;

  m.def("default_host_pool", &MemoryPool::default_host,
        "The process-wide host pool the batchers use when no pool is given.");
  m.def("cuda_built", &cuda_built, "Whether this build has CUDA support.");
  m.def("cuda_device_count", &cuda_device_count,
        "CUDA devices visible now (0 without CUDA support, a driver or a GPU).");
}

}  // namespace conveyor::bindings
