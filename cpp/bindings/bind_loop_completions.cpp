// LoopCompletions: the asyncio futures of one event loop's requests, resolved here.
//
// Runtime.infer_async submits each request with its future; when a batch's completions
// arrive (the queue's eventfd turns readable), resolve() settles every future of the batch
// in one call: the request's rows of each output as numpy views, or its error. Python runs
// per request only the await itself. A request whose answer Python must still shape (a
// model with Python steps after the batch, a monitor that captures each request) carries
// a Python value, `extra`, and is handed back to the caller with it instead.
//
// Requests to a batcher are held, not queued one by one: flush() (which the loop runs once
// the callbacks of the turn that submitted them have run) queues them together, each
// model's with one lock and one wake-up (submit_round), so that the requests of one turn can
// form one batch. Held requests that would fill half of the model's largest batch go at once
// (Batcher::round_flush_size): an instance starts on them while the loop reads the rest.
//
// Everything here runs with the GIL held, on the loop's thread (close() may flush from
// another thread, also with the GIL): the GIL is the lock of the tables below.
#include <pybind11/stl.h>

#include <algorithm>
#include <unordered_map>

#include "conveyor/batcher.h"
#include "conveyor/completion.h"
#include "conveyor/graph.h"
#include "batcher_convert.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

// Interned method names, made once (they live with the interpreter).
struct Names {
  PyObject* done = PyUnicode_InternFromString("done");
  PyObject* set_result = PyUnicode_InternFromString("set_result");
  PyObject* set_exception = PyUnicode_InternFromString("set_exception");
};

const Names& names() {
  static const Names* n = new Names();
  return *n;
}

bool future_done(PyObject* future) {
  PyObject* done = PyObject_CallMethodNoArgs(future, names().done);
  if (done == nullptr) throw py::error_already_set();
  const int truth = PyObject_IsTrue(done);
  Py_DECREF(done);
  if (truth < 0) throw py::error_already_set();
  return truth != 0;
}

void settle(PyObject* future, PyObject* method, PyObject* value) {
  PyObject* r = PyObject_CallMethodOneArg(future, method, value);
  if (r == nullptr) throw py::error_already_set();
  Py_DECREF(r);
}

class LoopCompletions {
 public:
  LoopCompletions() : queue_(std::make_shared<CompletionQueue>()) {}

  int fileno() const { return queue_->fd(); }
  size_t waiting() const { return entries_.size(); }
  size_t held() const { return held_.size(); }

  // Takes one request for `target` (a Batcher or a Graph) and keeps its future; returns
  // the request id, or 0 when `inputs` is a dict this call does not take as it is (see
  // order_dict): the caller orders and converts them itself and calls again with the tuple.
  // A Batcher's requests are held until flush() queues them together (or until they would
  // fill half of its largest batch); a Graph's are queued at once.
  uint64_t submit(py::handle target, py::handle inputs, py::object future, const py::tuple& input_names,
                  py::tuple output_names, int priority, int64_t timeout_us, uint64_t mirror_tag, py::object extra) {
    py::object arrays;
    if (PyTuple_CheckExact(inputs.ptr())) {
      arrays = py::reinterpret_borrow<py::object>(inputs);
    } else {
      arrays = order_dict(inputs, input_names);
      if (arrays.is_none()) return 0;
    }
    if (!target.is(last_target_)) {  // one model's requests come in runs: its C++ object, looked up once
      last_batcher_ = py::isinstance<Batcher>(target) ? target.cast<std::shared_ptr<Batcher>>() : nullptr;
      last_graph_ = last_batcher_ == nullptr ? &target.cast<Graph&>() : nullptr;
      last_target_ = py::reinterpret_borrow<py::object>(target);
    }
    uint64_t id = 0;
    if (last_batcher_ != nullptr) {
      Batcher::Queued queued{hold_request_inputs(last_batcher_->options().inputs, arrays.cast<py::tuple>()), queue_,
                             priority, timeout_us, mirror_tag, Batcher::reserve_request_id()};
      id = queued.id;
      held_.emplace_back(last_batcher_, std::move(queued));
    } else {
      id = last_graph_->submit(hold_request_inputs(last_graph_->options().inputs, arrays.cast<py::tuple>()), queue_,
                               priority, timeout_us, mirror_tag);
    }
    // The GIL is held from here to flush() and resolve(), which need it too: the entry is
    // in place before its request is queued, let alone completed.
    entries_.emplace(id, Entry{std::move(future), std::move(output_names), std::move(extra)});
    if (last_batcher_ != nullptr && held_.size() >= last_batcher_->round_flush_size()) flush();
    return id;
  }

  // Queues the held requests, each model's together (submit_round). A request the batcher
  // refuses (its shape, a full queue) fails its future with the reason.
  void flush() {
    // The last target is forgotten at the end of each turn: an unloaded model's stopped
    // batcher would otherwise stay until a submit named another model.
    last_target_ = py::object();
    last_batcher_.reset();
    last_graph_ = nullptr;
    if (held_.empty()) return;
    std::vector<std::pair<std::shared_ptr<Batcher>, Batcher::Queued>> held;  // the batchers live until queued
    held.swap(held_);
    std::vector<std::pair<Batcher*, Batcher::Queued>> round;
    round.reserve(held.size());
    for (auto& [batcher, queued] : held) {
      auto it = entries_.find(queued.id);
      if (it != entries_.end() && it->second.cancelled) {  // its caller was cancelled before it was queued
        entries_.erase(it);
        continue;
      }
      round.emplace_back(batcher.get(), std::move(queued));
    }
    std::vector<uint64_t> ids;
    ids.reserve(round.size());
    for (const auto& request : round) ids.push_back(request.second.id);
    std::vector<Batcher::Outcome> outcomes;
    try {
      outcomes = submit_round(std::move(round));
    } catch (const std::bad_alloc&) {  // the outcomes are lost: every held future fails
      outcomes.assign(ids.size(), Batcher::Outcome{0, ErrorCode::kOutOfMemory, "queueing the request ran out of memory"});
    }
    for (size_t k = 0; k < outcomes.size(); ++k) {
      if (outcomes[k].id != 0) continue;
      auto it = entries_.find(ids[k]);
      if (it == entries_.end()) continue;
      const Entry entry = std::move(it->second);
      entries_.erase(it);
      fail(entry.future.ptr(), make_exception(outcomes[k].code, outcomes[k].message));
    }
  }

  // The caller of request `id`, submitted to `target`, was cancelled: a held request is
  // not queued at all, a queued one is dropped if it has not started.
  void cancel(py::handle target, uint64_t id) {
    auto it = entries_.find(id);
    if (it == entries_.end()) return;
    for (const auto& [batcher, queued] : held_) {
      if (queued.id == id) {  // not queued yet: flush() leaves it out
        it->second.cancelled = true;
        return;
      }
    }
    if (py::isinstance<Batcher>(target)) {
      Batcher& batcher = target.cast<Batcher&>();
      py::gil_scoped_release nogil;
      batcher.cancel(id);
    } else {
      Graph& graph = target.cast<Graph&>();
      py::gil_scoped_release nogil;
      graph.cancel(id);
    }
  }

  // Settles the futures of every completion delivered so far. Returns the completions of
  // requests that carry an `extra`, for the caller to finish:
  // [(batch outputs or None, [(future, extra, error or None, row_offset, rows), ...]), ...].
  py::list resolve() {
    std::vector<std::vector<Completion>> groups = queue_->drain();
    py::list handed_back;
    for (auto& group : groups) {
      py::object outputs = py::none();
      py::object conversion_error = py::none();
      py::list back;
      for (Completion& c : group) {
        auto it = entries_.find(c.request_id);
        if (it == entries_.end()) continue;
        const Entry entry = std::move(it->second);
        entries_.erase(it);
        const py::object error = completion_error(c, outputs, conversion_error);
        if (!entry.extra.is_none()) {
          back.append(py::make_tuple(entry.future, entry.extra, error, c.row_offset, c.rows));
        } else {
          settle_one(entry, outputs, error, c);
        }
      }
      if (!back.empty()) handed_back.append(py::make_tuple(outputs, back));
    }
    return handed_back;
  }

 private:
  struct Entry {
    py::object future;
    py::tuple output_names;
    py::object extra;        // None: settled here
    bool cancelled = false;  // before flush() queued it
  };

  // One request's future: its outputs, or its error. Never throws: whatever goes wrong
  // settling one future (a result that cannot be made) fails that future alone.
  static void settle_one(const Entry& entry, const py::object& outputs, const py::object& error, const Completion& c) {
    PyObject* future = entry.future.ptr();
    try {
      if (future_done(future)) return;  // the caller was cancelled meanwhile
      if (!error.is_none()) {
        settle(future, names().set_exception, error.ptr());
        return;
      }
      py::dict result = request_outputs(outputs.cast<py::tuple>(), entry.output_names, c.row_offset, c.rows);
      settle(future, names().set_result, result.ptr());
    } catch (py::error_already_set& e) {
      const std::string reason = py::str(e.value());
      fail(future, make_exception(ErrorCode::kInternal, "completing the request failed: " + reason));
    } catch (const std::exception& e) {
      fail(future, make_exception(ErrorCode::kInternal, std::string("completing the request failed: ") + e.what()));
    }
  }

  static void fail(PyObject* future, const py::object& error) {
    try {
      if (future_done(future)) return;
      settle(future, names().set_exception, error.ptr());
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("conveyor: failing a request's future");
    }
  }

  std::shared_ptr<CompletionQueue> queue_;
  // The target of the last submit in this turn of the loop and its C++ object.
  py::object last_target_;
  std::shared_ptr<Batcher> last_batcher_;
  Graph* last_graph_ = nullptr;
  std::unordered_map<uint64_t, Entry> entries_;  // by request id; touched with the GIL held
  // Submitted, not queued yet, in order; touched with the GIL held.
  std::vector<std::pair<std::shared_ptr<Batcher>, Batcher::Queued>> held_;
};

// LoopCompletions.submit as a plain CPython fast call: pybind11's dispatcher costs about
// 0.8 us for nine arguments, more than the submission itself, on every request.
PyObject* submit_fastcall(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 9) {
      throw py::type_error("LoopCompletions.submit takes 9 positional arguments (target, inputs, future, "
                           "input_names, output_names, priority, timeout_us, mirror_tag, extra), got " +
                           std::to_string(nargs));
    }
    if (!PyTuple_Check(args[3]) || !PyTuple_Check(args[4])) {
      throw py::type_error("LoopCompletions.submit: input_names and output_names must be tuples");
    }
    const long priority = PyLong_AsLong(args[5]);
    const long long timeout_us = priority == -1 && PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[6]);
    const unsigned long long mirror_tag = PyErr_Occurred() ? 0 : PyLong_AsUnsignedLongLong(args[7]);
    if (PyErr_Occurred()) throw py::error_already_set();
    if (priority < INT32_MIN || priority > INT32_MAX) throw py::value_error("priority out of range");
    auto& completions = py::handle(self).cast<LoopCompletions&>();
    const uint64_t id = completions.submit(
        args[0], args[1], py::reinterpret_borrow<py::object>(args[2]), py::reinterpret_borrow<py::tuple>(args[3]),
        py::reinterpret_borrow<py::tuple>(args[4]), static_cast<int>(priority), timeout_us, mirror_tag,
        py::reinterpret_borrow<py::object>(args[8]));
    return PyLong_FromUnsignedLongLong(id);
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const Error& e) {
    const py::object error = make_exception(e.code(), e.what());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef submit_method = {
    "submit", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&submit_fastcall)), METH_FASTCALL,
    "submit(target, inputs, future, input_names, output_names, priority, timeout_us, mirror_tag, extra) -> "
    "request id, or 0 when a dict of inputs needs the caller's checks first (positional arguments only)."};

}  // namespace

void init_loop_completions(py::module_& m) {
  py::class_<LoopCompletions> cls(
      m, "LoopCompletions",
      "The asyncio futures of one event loop's requests. submit(target, inputs, future, input_names, "
      "output_names, priority, timeout_us, mirror_tag, extra) takes a request for a Batcher or Graph "
      "(inputs: a dict, or a tuple in the model's input order) and returns its id, or 0 when a dict needs "
      "the caller's checks first (a name missing or unexpected, a value that is not a C-contiguous numpy "
      "array): call again with the checked tuple. A Batcher's requests wait for flush(), which queues "
      "them together (a refused one fails its future); cancel(target, id) when a caller is cancelled. "
      "When fileno() turns readable, resolve() sets each future to {output name: the request's rows} or "
      "its error; requests submitted with an `extra` other than None come back instead, as [(batch "
      "outputs or None, [(future, extra, error or None, row_offset, rows)])].");
  cls.def(py::init<>())
      .def("fileno", &LoopCompletions::fileno)
      .def("waiting", &LoopCompletions::waiting, "Futures not settled yet.")
      .def("held", &LoopCompletions::held, "Requests submitted and not queued yet (flush() queues them).")
      .def("flush", &LoopCompletions::flush)
      .def("cancel", &LoopCompletions::cancel, py::arg("target"), py::arg("request_id"))
      .def("resolve", &LoopCompletions::resolve);
  PyObject* submit = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cls.ptr()), &submit_method);
  if (submit == nullptr) throw py::error_already_set();
  cls.attr("submit") = py::reinterpret_steal<py::object>(submit);
}

}  // namespace conveyor::bindings
