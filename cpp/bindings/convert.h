// Conversions shared by the binding files: numpy arrays <-> core tensors, Python owners,
// and conveyor::Error -> conveyor.errors types. Glue only: no policy lives here.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "conveyor/error.h"
#include "conveyor/tensor.h"

namespace conveyor::bindings {

namespace py = pybind11;

// numpy dtype <-> v2 datatype. BYTES travels as numpy object arrays.
DType dtype_from_numpy(const py::dtype& dtype, const char* what);
py::dtype numpy_dtype(DType dtype);

// A tensor that borrows a C-contiguous CPU numpy array's memory (owner stays null):
// the caller keeps the array alive for as long as the tensor is used.
// Throws Error(kInvalidInput) for a non-contiguous array or an unsupported dtype,
// naming `what` (e.g. "input 'x'").
Tensor borrow_array(py::handle obj, const char* what);

// borrow_array over a sequence; item i is named "<what> i" in errors.
std::vector<Tensor> borrow_arrays(const py::sequence& arrays, const char* what);

// The GIL, taken on a thread Python did not start (a batcher instance, the HTTP front
// end's I/O thread), like py::gil_scoped_acquire. The thread's Python thread state is
// made the first time and kept until the thread exits: pybind11's makes and frees one per
// acquisition, and each one maps and unmaps its frame stack (two system calls and a TLB
// flush per batch, measured at 30-40 us of an idle round trip). The thread's exit frees
// it, which takes the GIL: whoever joins such a thread must not hold the GIL (the
// batcher's and the front end's stop and destructor release it already).
class ThreadGil {
 public:
  ThreadGil() = default;
  ThreadGil(const ThreadGil&) = delete;
  ThreadGil& operator=(const ThreadGil&) = delete;

 private:
  struct KeepThreadState {
    KeepThreadState();  // makes this thread's state once; runs before gil_ takes the GIL
  };
  KeepThreadState keep_;
  py::gil_scoped_acquire gil_;
};

// An owner that holds a Python object; its release takes the GIL, so it may be dropped
// on any thread that holds no core lock.
std::shared_ptr<void> make_python_owner(py::object obj);

// borrow_arrays whose tensors also hold `keep_alive` (one Python object keeping every
// array alive: the sequence itself, usually) as their owner, so whatever receives them
// (a batch, a result) keeps the arrays alive without the caller's help.
std::vector<Tensor> hold_arrays(const py::sequence& arrays, const char* what);

// A numpy array over a CPU tensor. Every array it returns owns what it shows: when the
// tensor's owner is a Python object covering exactly this data, that object itself;
// otherwise a view whose base keeps the owner alive. BYTES elements are Python objects
// that the tensor only points at (unless its owner is the object array holding them),
// so for BYTES a new object array with its own reference to each element is returned.
// A tensor with no owner is refused (InternalError): a view of it could dangle.
py::object array_from_tensor(const Tensor& tensor);
// array_from_tensor over each tensor, as a list; tensors with one owner (the outputs of
// one pooled block) share one capsule as their arrays' base.
py::list arrays_from_tensors(const std::vector<Tensor>& tensors);

// The conveyor.errors instance for a core error (used for errors delivered as values).
py::object make_exception(ErrorCode code, const std::string& message);
// conveyor.errors.ConveyorError, the base of every error type.
py::handle conveyor_error_base();
// conveyor.errors.InvalidInput: a Python step that refuses a batch keeps the error's code.
py::handle conveyor_invalid_input();
void register_errors(py::module_& m);

}  // namespace conveyor::bindings
