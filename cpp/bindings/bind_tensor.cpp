#include <pybind11/stl.h>

#include <string>

#include "convert.h"

namespace conveyor::bindings {

namespace {

// Exception types, created once at import; conveyor/errors.py re-exports them.
struct ErrorTypes {
  py::object base, invalid_input, queue_full, deadline_exceeded, cancelled, model_execution,
      out_of_memory, unavailable, internal;
};

ErrorTypes& error_types() {
  static ErrorTypes* types = new ErrorTypes();  // never destroyed: lives with the interpreter
  return *types;
}

py::object new_exception(py::module_& m, const char* name, py::handle bases, const char* doc) {
  std::string qualified = std::string("conveyor.errors.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases.ptr(), nullptr);
  if (!type) throw py::error_already_set();
  py::object obj = py::reinterpret_steal<py::object>(type);
  m.attr(name) = obj;
  return obj;
}

py::object type_for(ErrorCode code) {
  auto& t = error_types();
  switch (code) {
    case ErrorCode::kInvalidInput: return t.invalid_input;
    case ErrorCode::kQueueFull: return t.queue_full;
    case ErrorCode::kDeadlineExceeded: return t.deadline_exceeded;
    case ErrorCode::kCancelled: return t.cancelled;
    case ErrorCode::kModelExecution: return t.model_execution;
    case ErrorCode::kOutOfMemory: return t.out_of_memory;
    case ErrorCode::kUnavailable: return t.unavailable;
    default: return t.internal;
  }
}

// Py_IsFinalizing became public in Python 3.13, which removed the private _Py_IsFinalizing.
bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// Deleter of owners made by make_python_owner; its type identifies them (std::get_deleter).
struct PythonObjectDeleter {
  void operator()(void* obj) const {
    // At interpreter shutdown the object goes with the interpreter: leak instead.
    if (!Py_IsInitialized() || interpreter_finalizing()) return;
    ThreadGil gil;
    Py_DECREF(static_cast<PyObject*>(obj));
  }
};

// The thread state ThreadGil keeps for a thread Python did not start, freed when the
// thread exits (unless the interpreter is going or gone: then it goes with it).
struct KeptThreadState {
  PyThreadState* state = nullptr;

  KeptThreadState() {
    if (PyGILState_GetThisThreadState() != nullptr) return;  // a Python thread, or one that made its own
    PyGILState_Ensure();           // makes the state (its count at 1: kept) and takes the GIL
    state = PyEval_SaveThread();   // and gives the GIL back; the state stays this thread's
  }

  ~KeptThreadState() {
    if (state == nullptr || !Py_IsInitialized() || interpreter_finalizing()) return;
    PyEval_RestoreThread(state);
    PyGILState_Release(PyGILState_UNLOCKED);  // the count reaches 0: the state is freed, the GIL released
  }
};

}  // namespace

ThreadGil::KeepThreadState::KeepThreadState() { thread_local KeptThreadState kept; }

namespace {

void release_capsule(PyObject* capsule) {
  delete static_cast<std::shared_ptr<void>*>(PyCapsule_GetPointer(capsule, "conveyor.owner"));
}

}  // namespace

DType dtype_from_numpy(const py::dtype& dtype, const char* what) {
  const char kind = dtype.kind();
  const auto size = dtype.itemsize();
  switch (kind) {
    case 'b': return DType::kBool;
    case 'O': return DType::kBytes;
    case 'u':
      if (size == 1) return DType::kUInt8;
      if (size == 2) return DType::kUInt16;
      if (size == 4) return DType::kUInt32;
      if (size == 8) return DType::kUInt64;
      break;
    case 'i':
      if (size == 1) return DType::kInt8;
      if (size == 2) return DType::kInt16;
      if (size == 4) return DType::kInt32;
      if (size == 8) return DType::kInt64;
      break;
    case 'f':
      if (size == 2) return DType::kFloat16;
      if (size == 4) return DType::kFloat32;
      if (size == 8) return DType::kFloat64;
      break;
    default: break;
  }
  throw Error(ErrorCode::kInvalidInput,
              std::string(what) + " has numpy dtype '" + py::str(dtype).cast<std::string>() +
                  "', which has no v2 datatype: use bool, (u)int8-64, float16/32/64, or an "
                  "object array of bytes for BYTES");
}

py::dtype numpy_dtype(DType dtype) {
  // dtype::of looks the type number up; a format string would be parsed on every call.
  switch (dtype) {
    case DType::kBool: return py::dtype::of<bool>();
    case DType::kUInt8: return py::dtype::of<uint8_t>();
    case DType::kUInt16: return py::dtype::of<uint16_t>();
    case DType::kUInt32: return py::dtype::of<uint32_t>();
    case DType::kUInt64: return py::dtype::of<uint64_t>();
    case DType::kInt8: return py::dtype::of<int8_t>();
    case DType::kInt16: return py::dtype::of<int16_t>();
    case DType::kInt32: return py::dtype::of<int32_t>();
    case DType::kInt64: return py::dtype::of<int64_t>();
    case DType::kFloat16: return py::dtype("f2");
    case DType::kFloat32: return py::dtype::of<float>();
    case DType::kFloat64: return py::dtype::of<double>();
    case DType::kBytes: return py::dtype("O");
    case DType::kBFloat16: break;
  }
  throw Error(ErrorCode::kInvalidInput, "[tensor] BF16 has no numpy dtype; send it as raw bytes");
}

Tensor borrow_array(py::handle obj, const char* what) {
  if (!py::isinstance<py::array>(obj)) {
    throw Error(ErrorCode::kInvalidInput,
                std::string(what) + " must be a numpy array, got " +
                    py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!(arr.flags() & py::array::c_style)) {
    throw Error(ErrorCode::kInvalidInput,
                std::string(what) + " is not C-contiguous: pass np.ascontiguousarray(...)");
  }
  Tensor t;
  t.dtype = dtype_from_numpy(arr.dtype(), what);
  t.shape = Shape(reinterpret_cast<const int64_t*>(arr.shape()), static_cast<int>(arr.ndim()));
  t.data = const_cast<void*>(arr.data());
  return t;
}

std::vector<Tensor> borrow_arrays(const py::sequence& arrays, const char* what) {
  std::vector<Tensor> tensors;
  tensors.reserve(arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    const std::string name = std::string(what) + " " + std::to_string(i);
    tensors.push_back(borrow_array(arrays[i], name.c_str()));
  }
  return tensors;
}

std::shared_ptr<void> make_python_owner(py::object obj) {
  return std::shared_ptr<void>(obj.release().ptr(), PythonObjectDeleter{});
}

std::vector<Tensor> hold_arrays(const py::sequence& arrays, const char* what) {
  std::vector<Tensor> tensors = borrow_arrays(arrays, what);
  if (!tensors.empty()) {
    std::shared_ptr<void> owner = make_python_owner(py::reinterpret_borrow<py::object>(arrays));
    for (Tensor& t : tensors) t.owner = owner;
  }
  return tensors;
}

namespace {

// The Python object array the tensor's owner is when it shows exactly that array's data.
PyObject* owning_array(const Tensor& tensor, const py::dtype& dtype, const std::vector<py::ssize_t>& shape) {
  if (!tensor.owner || !std::get_deleter<PythonObjectDeleter>(tensor.owner)) return nullptr;
  auto* obj = static_cast<PyObject*>(tensor.owner.get());
  if (!py::isinstance<py::array>(obj)) return nullptr;
  auto arr = py::reinterpret_borrow<py::array>(obj);
  const bool same = arr.data() == tensor.data && arr.ndim() == tensor.shape.ndim() &&
                    std::equal(shape.begin(), shape.end(), arr.shape()) && (arr.flags() & py::array::c_style) &&
                    arr.dtype().kind() == dtype.kind() && arr.dtype().itemsize() == dtype.itemsize();
  return same ? obj : nullptr;
}

// A new object array holding its own reference to each element the tensor points at
// (None where it holds a null pointer).
py::object bytes_array_copy(const Tensor& tensor, const std::vector<py::ssize_t>& shape) {
  py::array copy(py::dtype("O"), shape);
  auto* const* from = static_cast<PyObject* const*>(tensor.data);
  auto** to = static_cast<PyObject**>(copy.mutable_data());
  const int64_t count = tensor.shape.numel();
  for (int64_t i = 0; i < count; ++i) {
    PyObject* item = from[i] ? from[i] : Py_None;
    Py_INCREF(item);
    Py_XDECREF(to[i]);  // numpy filled the new array with None
    to[i] = item;
  }
  return std::move(copy);
}

}  // namespace

namespace {

// array_from_tensor; `shared_base` (null: none yet) is the capsule made for the previous
// tensor of the same call, reused when this tensor has the same owner.
py::object array_with_base(const Tensor& tensor, py::object* shared_base, const void** shared_owner) {
  if (tensor.device.kind == DeviceKind::kCUDA) {
    throw Error(ErrorCode::kInvalidInput, "[tensor] a CUDA tensor has no numpy view");
  }
  py::dtype dtype = numpy_dtype(tensor.dtype);
  std::vector<py::ssize_t> shape(tensor.shape.data(), tensor.shape.data() + tensor.shape.ndim());
  if (PyObject* same = owning_array(tensor, dtype, shape)) return py::reinterpret_borrow<py::object>(same);
  if (!tensor.owner) {
    throw Error(ErrorCode::kInternal,
                "[tensor] a tensor of shape " + tensor.shape.to_string() +
                    " has no owner, so a numpy view of it could outlive its memory (a bug: please report it)");
  }
  if (tensor.dtype == DType::kBytes) return bytes_array_copy(tensor, shape);
  py::object base;
  if (std::get_deleter<PythonObjectDeleter>(tensor.owner)) {
    // Owned by a Python object: the view's base is that object (no capsule needed).
    base = py::reinterpret_borrow<py::object>(static_cast<PyObject*>(tensor.owner.get()));
  } else if (shared_base != nullptr && *shared_base && *shared_owner == tensor.owner.get()) {
    base = *shared_base;
  } else {
    auto* holder = new std::shared_ptr<void>(tensor.owner);
    base = py::reinterpret_steal<py::object>(PyCapsule_New(holder, "conveyor.owner", release_capsule));
    if (!base) {
      delete holder;
      throw py::error_already_set();
    }
    if (shared_base != nullptr) {
      *shared_base = base;
      *shared_owner = tensor.owner.get();
    }
  }
  return py::array(dtype, shape, {}, tensor.data, base);
}

}  // namespace

py::object array_from_tensor(const Tensor& tensor) { return array_with_base(tensor, nullptr, nullptr); }

py::list arrays_from_tensors(const std::vector<Tensor>& tensors) {
  py::list arrays(tensors.size());
  py::object shared_base;
  const void* shared_owner = nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    arrays[i] = array_with_base(tensors[i], &shared_base, &shared_owner);
  }
  return arrays;
}

py::object make_exception(ErrorCode code, const std::string& message) {
  return type_for(code)(message);
}

py::handle conveyor_error_base() { return error_types().base; }

py::handle conveyor_invalid_input() { return error_types().invalid_input; }

void register_errors(py::module_& m) {
  auto& t = error_types();
  t.base = new_exception(m, "ConveyorError", PyExc_Exception, "Base of every error Conveyor raises.");
  py::tuple invalid_bases = py::make_tuple(t.base, py::handle(PyExc_ValueError));
  t.invalid_input = new_exception(m, "InvalidInput", invalid_bases,
                                  "A request or argument does not match what the model expects.");
  t.queue_full = new_exception(m, "QueueFull", t.base, "The model's bounded queue is full; retry later.");
  py::tuple deadline_bases = py::make_tuple(t.base, py::handle(PyExc_TimeoutError));
  t.deadline_exceeded = new_exception(m, "DeadlineExceeded", deadline_bases,
                                      "The request's deadline passed before it was executed.");
  t.cancelled = new_exception(m, "Cancelled", t.base, "The request was cancelled by its caller.");
  t.model_execution = new_exception(m, "ModelExecutionError", t.base,
                                    "The model failed while executing a batch; the message carries the backend's error.");
  py::tuple oom_bases = py::make_tuple(t.base, py::handle(PyExc_MemoryError));
  t.out_of_memory = new_exception(m, "OutOfMemory", oom_bases,
                                  "A memory pool could not satisfy an allocation within its limit.");
  t.unavailable = new_exception(m, "Unavailable", t.base, "The runtime or model is shutting down or stopped.");
  t.internal = new_exception(m, "InternalError", t.base, "A broken invariant inside Conveyor (a bug: please report it).");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(type_for(e.code()).ptr(), e.what());
    }
  });
}

void init_tensor(py::module_& m) {
  m.def("dtype_size", [](const std::string& name) { return dtype_size(dtype_from_name(name)); },
        py::arg("datatype"), "Bytes per element of a v2 datatype (BYTES: 8, an object handle).");
}

}  // namespace conveyor::bindings
