// conveyor._core.Monitor, Reference, WindowState, DriftReport and evaluate_drift: the
// live monitor of conveyor/monitor.h. The Batcher binding takes a Monitor through its
// `monitor=` keyword and wraps the executor with it, so observation runs in C++ on the
// instance threads.
//
// Glue only: numpy arrays and dicts become the core's types (copied), names become enums
// in the core, and observe()/evaluate_drift() release the GIL while they compute.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "conveyor/monitor.h"
#include "convert.h"

namespace conveyor::bindings {

using monitor::DriftReport;
using monitor::FeatureSpec;
using monitor::Monitor;
using monitor::WindowState;

namespace {

[[noreturn]] void bad_argument(const std::string& what) { throw Error(ErrorCode::kInvalidInput, "[monitor] " + what); }

// The immutable core reference, shared by monitors and evaluations.
struct ReferenceHandle {
  std::shared_ptr<const monitor::Reference> reference;
};

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// A copy of any array-like of numbers as doubles (flattened), naming `what` on failure.
std::vector<double> to_doubles(py::handle obj, const std::string& what) {
  DoubleArray arr = DoubleArray::ensure(obj);
  if (!arr) {
    PyErr_Clear();
    bad_argument("argument '" + what + "' must be an array of numbers");
  }
  return std::vector<double>(arr.data(), arr.data() + arr.size());
}

std::vector<double> to_doubles_of_size(py::handle obj, const std::string& what, size_t size) {
  std::vector<double> v = to_doubles(obj, what);
  if (v.size() != size) {
    bad_argument("argument '" + what + "' needs " + std::to_string(size) + " values (one per feature), got " +
                 std::to_string(v.size()));
  }
  return v;
}

ReferenceHandle make_reference_handle(const std::vector<std::string>& kinds, const py::sequence& edges,
                                      const py::sequence& probabilities, py::handle mean, py::handle std,
                                      py::handle min, py::handle max, uint64_t rows, py::handle mahalanobis_features,
                                      py::handle mahalanobis_mean, py::handle precision, double outlier_threshold) {
  const size_t n = kinds.size();
  if (edges.size() != n || probabilities.size() != n) {
    bad_argument("arguments 'edges' and 'probabilities' need one array per feature (" + std::to_string(n) +
                 " kinds), got " + std::to_string(edges.size()) + " and " + std::to_string(probabilities.size()));
  }
  monitor::Reference r;
  r.rows = rows;
  r.features.resize(n);
  const std::vector<double> means = to_doubles_of_size(mean, "mean", n), stds = to_doubles_of_size(std, "std", n),
                            mins = to_doubles_of_size(min, "min", n), maxs = to_doubles_of_size(max, "max", n);
  for (size_t i = 0; i < n; ++i) {
    monitor::FeatureReference& f = r.features[i];
    f.kind = monitor::feature_kind_from_name(kinds[i]);
    f.edges = to_doubles(edges[i], "edges[" + std::to_string(i) + "]");
    f.probabilities = to_doubles(probabilities[i], "probabilities[" + std::to_string(i) + "]");
    f.mean = means[i];
    f.std = stds[i];
    f.min = mins[i];
    f.max = maxs[i];
  }
  if (!mahalanobis_features.is_none()) {
    for (double v : to_doubles(mahalanobis_features, "mahalanobis_features")) {
      r.mahalanobis_features.push_back(static_cast<int>(v));
    }
    r.mahalanobis_mean = to_doubles(mahalanobis_mean, "mahalanobis_mean");
    r.precision = to_doubles(precision, "precision");
  }
  r.outlier_threshold = outlier_threshold;
  return ReferenceHandle{monitor::make_reference(std::move(r))};
}

std::shared_ptr<const monitor::Reference> reference_of(py::handle obj, const char* what) {
  if (py::isinstance<ReferenceHandle>(obj)) return obj.cast<const ReferenceHandle&>().reference;
  if (py::isinstance<Monitor>(obj)) {
    auto reference = obj.cast<const Monitor&>().reference();
    if (!reference) bad_argument(std::string("argument '") + what + "': the monitor has no reference yet");
    return reference;
  }
  if (py::hasattr(obj, "to_core")) return reference_of(obj.attr("to_core")(), what);
  bad_argument(std::string("argument '") + what + "' must be a Reference (or a Monitor with one), got " +
               py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
}

FeatureSpec feature_from_dict(py::handle item, size_t i) {
  const std::string where = "features[" + std::to_string(i) + "]";
  if (!py::isinstance<py::dict>(item)) bad_argument("argument '" + where + "' must be a dict");
  auto d = py::reinterpret_borrow<py::dict>(item);
  for (auto [key, value] : d) {
    const std::string k = py::str(key).cast<std::string>();
    if (k != "name" && k != "source" && k != "tensor" && k != "column" && k != "derive" && k != "kind") {
      bad_argument("argument '" + where + "' has the unknown key '" + k +
                   "' (expected name, source, tensor, column, derive, kind)");
    }
  }
  if (!d.contains("name")) bad_argument("argument '" + where + "' needs a 'name'");
  FeatureSpec f;
  f.name = py::str(d["name"]).cast<std::string>();
  if (d.contains("source")) f.source = monitor::source_from_name(d["source"].cast<std::string>());
  if (d.contains("tensor")) f.tensor = d["tensor"].cast<int>();
  if (d.contains("column")) f.column = d["column"].cast<int64_t>();
  if (d.contains("derive")) f.derive = monitor::derive_from_name(d["derive"].cast<std::string>());
  // A predicted class is categorical; everything else numeric unless said otherwise.
  f.kind = d.contains("kind") ? monitor::feature_kind_from_name(d["kind"].cast<std::string>())
           : f.derive == monitor::Derive::kPredictedClass ? monitor::FeatureKind::kCategorical
                                                           : monitor::FeatureKind::kNumeric;
  return f;
}

py::dict feature_to_dict(const FeatureSpec& f) {
  py::dict d;
  d["name"] = f.name;
  d["source"] = monitor::source_name(f.source);
  d["tensor"] = f.tensor;
  d["column"] = f.column;
  d["derive"] = monitor::derive_name(f.derive);
  d["kind"] = monitor::feature_kind_name(f.kind);
  return d;
}

int64_t now_or(py::handle now_ns) { return now_ns.is_none() ? monitor::wall_clock_ns() : now_ns.cast<int64_t>(); }

// Per-feature field of a window state as a fresh numpy array.
template <typename T, typename Get>
py::array_t<T> per_feature(const WindowState& s, Get get) {
  py::array_t<T> out(static_cast<py::ssize_t>(s.feature_count()));
  T* p = out.mutable_data();
  for (size_t i = 0; i < s.feature_count(); ++i) p[i] = get(s, i);
  return out;
}

template <typename T>
py::array_t<T> array_of(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

py::list indices_with(const DriftReport& r, monitor::Status status) {
  py::list out;
  for (size_t i = 0; i < r.status.size(); ++i) {
    if (r.status[i] == status) out.append(i);
  }
  return out;
}

void bind_window_state(py::module_& m) {
  py::class_<WindowState>(m, "WindowState",
                          "Statistics of one window (plain data): merge() adds another window over the same "
                          "reference; to_bytes()/from_bytes() ship it between processes. Array properties are "
                          "fresh copies, one entry per feature.")
      .def(py::init<>())
      .def_readonly("rows", &WindowState::rows)
      .def_readonly("outlier_rows", &WindowState::outlier_rows)
      .def_readonly("out_of_range_rows", &WindowState::out_of_range_rows)
      .def_readonly("nonfinite_rows", &WindowState::nonfinite_rows)
      .def_readonly("start_ns", &WindowState::start_ns, "Time of the first observation (the observer's clock).")
      .def_readonly("end_ns", &WindowState::end_ns, "Time of the last observation.")
      .def_readonly("layout", &WindowState::layout, "Fingerprint of the reference's bins (0: an empty state).")
      .def_property_readonly("feature_count", &WindowState::feature_count)
      .def_property_readonly("count", [](const WindowState& s) {
        return per_feature<uint64_t>(s, [](const WindowState& w, size_t i) { return w.features[i].count; });
      }, "Finite values per feature.")
      .def_property_readonly("nan", [](const WindowState& s) {
        return per_feature<uint64_t>(s, [](const WindowState& w, size_t i) { return w.features[i].nan; });
      })
      .def_property_readonly("inf", [](const WindowState& s) {
        return per_feature<uint64_t>(s, [](const WindowState& w, size_t i) { return w.features[i].inf; });
      })
      .def_property_readonly("out_of_range", [](const WindowState& s) {
        return per_feature<uint64_t>(s, [](const WindowState& w, size_t i) { return w.features[i].out_of_range; });
      })
      .def_property_readonly("shift", [](const WindowState& s) { return array_of(s.shift); },
                             "The value the sums are taken around (the reference mean).")
      .def_property_readonly("sum", [](const WindowState& s) {
        return per_feature<double>(s, [](const WindowState& w, size_t i) { return w.features[i].sum; });
      }, "Sum of (value - shift) over finite values.")
      .def_property_readonly("sum_sq", [](const WindowState& s) {
        return per_feature<double>(s, [](const WindowState& w, size_t i) { return w.features[i].sum_sq; });
      }, "Sum of (value - shift)**2 over finite values.")
      .def_property_readonly("min", [](const WindowState& s) {
        return per_feature<double>(s, [](const WindowState& w, size_t i) { return w.features[i].min; });
      })
      .def_property_readonly("max", [](const WindowState& s) {
        return per_feature<double>(s, [](const WindowState& w, size_t i) { return w.features[i].max; });
      })
      .def_property_readonly("mean", [](const WindowState& s) {
        return per_feature<double>(s, [](const WindowState& w, size_t i) { return w.mean(i); });
      })
      .def_property_readonly("std", [](const WindowState& s) {
        return per_feature<double>(s, [](const WindowState& w, size_t i) { return w.std(i); });
      }, "Population standard deviation (ddof 0).")
      .def_property_readonly("bin_counts", [](const WindowState& s) { return array_of(s.bin_counts); },
                             "Every feature's bin counts, concatenated; feature i is "
                             "[bin_offsets[i], bin_offsets[i+1]).")
      .def_property_readonly("bin_offsets", [](const WindowState& s) { return array_of(s.bin_offset); })
      .def(
          "histogram",
          [](const WindowState& s, size_t feature) {
            if (feature >= s.feature_count()) {
              bad_argument("argument 'feature': " + std::to_string(feature) + " is not below the feature count " +
                           std::to_string(s.feature_count()));
            }
            return py::array_t<uint64_t>(static_cast<py::ssize_t>(s.bins(feature)), s.counts(feature));
          },
          py::arg("feature"), "Row counts per bin of one feature (len = reference edges + 1).")
      .def("merge", &WindowState::merge, py::arg("other"),
           "Add another window's statistics in place (states over the same reference only).")
      .def("copy", [](const WindowState& s) { return WindowState(s); })
      .def("to_bytes", [](const WindowState& s) { return py::bytes(s.to_bytes()); })
      .def_static(
          "from_bytes", [](const py::bytes& b) { return WindowState::from_bytes(std::string_view(b)); },
          py::arg("data"), "The state written by to_bytes(); raises InvalidInput for other or damaged bytes.");
}

void bind_report(py::module_& m) {
  using R = DriftReport;
  py::class_<R> report(m, "DriftReport",
                       "Drift of a window against its reference: one numpy array per statistic (one entry per "
                       "feature, NaN where a statistic does not apply), the statuses and the verdict.");
  for (auto [name, field] : {std::pair{"psi", &R::psi}, {"js", &R::js}, {"ks", &R::ks},
                             {"ks_error_bound", &R::ks_error_bound}, {"wasserstein", &R::wasserstein},
                             {"chi2", &R::chi2}, {"p_value", &R::p_value}, {"adjusted_p_value", &R::adjusted_p_value},
                             {"missing_ratio", &R::missing_ratio}, {"out_of_range_ratio", &R::out_of_range_ratio},
                             {"mean", &R::mean}, {"std", &R::std}, {"min", &R::min}, {"max", &R::max}}) {
    report.def_property_readonly(name, [field = field](const R& r) { return array_of(r.*field); });
  }
  report.def_property_readonly("count", [](const R& r) { return array_of(r.count); }, "Finite values per feature.")
      .def_property_readonly(
          "status",
          [](const R& r) {
            py::list out;
            for (monitor::Status s : r.status) out.append(monitor::status_name(s));
            return out;
          },
          "'ok', 'warn' or 'alert' per feature.")
      .def_property_readonly("alerting", [](const R& r) { return indices_with(r, monitor::Status::kAlert); },
                             "Indices of the alerting features.")
      .def_property_readonly("warning", [](const R& r) { return indices_with(r, monitor::Status::kWarn); },
                             "Indices of the warning features.")
      .def_readonly("alert", &R::alert, "The model verdict: some feature alerts.")
      .def_readonly("rows", &R::rows)
      .def_readonly("outlier_rows", &R::outlier_rows)
      .def_readonly("out_of_range_rows", &R::out_of_range_rows)
      .def_readonly("nonfinite_rows", &R::nonfinite_rows)
      .def_readonly("outlier_rate", &R::outlier_rate);
}

void bind_reference(py::module_& m) {
  py::class_<ReferenceHandle>(m, "Reference",
                              "The immutable reference a Monitor bins against (built by "
                              "conveyor.monitor.reference.build_reference).")
      .def(py::init(&make_reference_handle), py::kw_only(), py::arg("kinds"), py::arg("edges"),
           py::arg("probabilities"), py::arg("mean"), py::arg("std"), py::arg("min"), py::arg("max"), py::arg("rows"),
           py::arg("mahalanobis_features") = py::none(), py::arg("mahalanobis_mean") = py::none(),
           py::arg("precision") = py::none(), py::arg("outlier_threshold") = std::numeric_limits<double>::infinity(),
           "kinds: 'numeric' | 'categorical' per feature; edges: inner bin edges (numeric) or sorted categories; "
           "probabilities: one per bin (len(edges) + 1, the last categorical bin being 'other'); precision: k x k.")
      .def_property_readonly("rows", [](const ReferenceHandle& h) { return h.reference->rows; })
      .def_property_readonly("feature_count", [](const ReferenceHandle& h) { return h.reference->features.size(); })
      .def_property_readonly("layout", [](const ReferenceHandle& h) { return h.reference->layout; })
      .def_property_readonly("outlier_threshold",
                             [](const ReferenceHandle& h) { return h.reference->outlier_threshold; })
      .def_property_readonly("mahalanobis_features",
                             [](const ReferenceHandle& h) { return h.reference->mahalanobis_features; })
      .def(
          "edges", [](const ReferenceHandle& h, size_t i) { return array_of(h.reference->features.at(i).edges); },
          py::arg("feature"))
      .def(
          "probabilities",
          [](const ReferenceHandle& h, size_t i) { return array_of(h.reference->features.at(i).probabilities); },
          py::arg("feature"));
}

void bind_monitor_class(py::module_& m) {
  py::class_<Monitor, std::shared_ptr<Monitor>>(
      m, "Monitor",
      "Per-feature statistics of every row a model serves, in a rows ring and a time ring of sub-windows. Pass it "
      "to Batcher(monitor=...) to observe every batch in C++, or call observe() directly.")
      .def(py::init([](const py::sequence& features, int64_t window_rows, int sub_windows, double window_seconds,
                       int64_t reference_rows) {
             monitor::MonitorOptions o;
             for (size_t i = 0; i < features.size(); ++i) o.features.push_back(feature_from_dict(features[i], i));
             o.window_rows = window_rows;
             o.sub_windows = sub_windows;
             o.window_seconds = window_seconds;
             o.reference_rows = reference_rows;
             return std::make_shared<Monitor>(std::move(o));
           }),
           py::kw_only(), py::arg("features"), py::arg("window_rows") = 1000, py::arg("sub_windows") = 10,
           py::arg("window_seconds") = 10.0, py::arg("reference_rows") = 10000,
           "features: dicts {name, source='input'|'output', tensor=0, column=0, derive='value'|'predicted_class'|"
           "'confidence'|'confidence_from_logits', kind='numeric'|'categorical'}.")
      .def(
          "set_reference",
          [](Monitor& mon, py::handle reference) { mon.set_reference(reference_of(reference, "reference")); },
          py::arg("reference"), "Bin against this Reference from now on (both rings start afresh).")
      .def_property_readonly("reference",
                             [](const Monitor& mon) -> py::object {
                               auto r = mon.reference();
                               return r ? py::cast(ReferenceHandle{r}) : py::none();
                             })
      .def(
          "observe",
          [](Monitor& mon, const py::sequence& inputs, const py::sequence& outputs, py::object now_ns,
             py::object rows) {
            std::vector<Tensor> in = borrow_arrays(inputs, "input"), out = borrow_arrays(outputs, "output");
            int64_t n = 1;
            if (!rows.is_none()) {
              n = rows.cast<int64_t>();
            } else {
              const Tensor* first = !in.empty() ? &in[0] : !out.empty() ? &out[0] : nullptr;
              if (!first) bad_argument("argument 'rows' is needed when there are no inputs or outputs");
              n = first->shape.ndim() > 0 ? first->shape[0] : 1;
            }
            if (n < 0) bad_argument("argument 'rows' must be >= 0, got " + std::to_string(n));
            const int64_t now = now_or(now_ns);
            py::array_t<uint8_t> flags(static_cast<py::ssize_t>(n));
            uint8_t* p = flags.mutable_data();
            {
              // Reads arrays the caller keeps alive; no Python object is touched.
              py::gil_scoped_release nogil;
              mon.observe(in, out, n, now, p);
            }
            return flags;
          },
          py::arg("inputs"), py::arg("outputs") = py::tuple(), py::kw_only(), py::arg("now_ns") = py::none(),
          py::arg("rows") = py::none(),
          "Observe a batch (rows = the first dimension of the first array unless given); returns the uint8 flags "
          "per row: bit 0 out of range, bit 1 NaN/inf, bit 2 Mahalanobis outlier. now_ns: time.time_ns() if None.")
      .def(
          "window",
          [](const Monitor& mon, const std::string& kind, py::object now_ns) {
            return mon.window(monitor::window_kind_from_name(kind), now_or(now_ns));
          },
          py::arg("kind") = "rows", py::arg("now_ns") = py::none(),
          "The current window: 'rows' (the last window_rows rows) or 'time' (the last window_seconds up to now_ns).")
      .def_property_readonly("reference_ready", &Monitor::reference_ready)
      .def_property_readonly("collected_rows", &Monitor::collected_rows,
                             "Live-reference rows collected while no reference was set.")
      .def(
          "take_reference_rows",
          [](const Monitor& mon) {
            std::vector<double> rows = mon.reference_rows();
            const auto features = static_cast<py::ssize_t>(mon.options().features.size());
            py::array_t<double> out({static_cast<py::ssize_t>(rows.size()) / features, features});
            std::copy(rows.begin(), rows.end(), out.mutable_data());
            return out;
          },
          "A float64 [collected_rows, features] copy of the live-reference rows (empty once a reference is set).")
      .def_property_readonly("memory_bytes", &Monitor::memory_bytes)
      .def_property_readonly("rows_observed", &Monitor::rows_observed)
      .def_property_readonly("anomalous_rows", &Monitor::anomalous_rows, "Rows observed with a non-zero flag.")
      .def_property_readonly("failed_batches", &Monitor::failed_batches,
                             "Batches the monitor could not read (the requests still succeeded).")
      .def_property_readonly("features",
                             [](const Monitor& mon) {
                               py::list out;
                               for (const FeatureSpec& f : mon.options().features) out.append(feature_to_dict(f));
                               return out;
                             })
      .def_property_readonly("window_rows", [](const Monitor& mon) { return mon.options().window_rows; })
      .def_property_readonly("sub_windows", [](const Monitor& mon) { return mon.options().sub_windows; })
      .def_property_readonly("window_seconds", [](const Monitor& mon) { return mon.options().window_seconds; })
      .def_property_readonly("reference_rows", [](const Monitor& mon) { return mon.options().reference_rows; });
}

}  // namespace

void init_monitor(py::module_& m) {
  bind_window_state(m);
  bind_report(m);
  bind_reference(m);
  bind_monitor_class(m);
  m.def(
      "evaluate_drift",
      [](py::handle monitor_or_reference, const WindowState& state, double psi_warn, double psi_alert, double alpha,
         const std::string& correction, double eps) {
        std::shared_ptr<const monitor::Reference> reference =
            reference_of(monitor_or_reference, "monitor_or_reference");
        monitor::DriftOptions o;
        o.psi_warn = psi_warn;
        o.psi_alert = psi_alert;
        o.alpha = alpha;
        o.correction = monitor::correction_from_name(correction);
        o.eps = eps;
        // Pure computation over copied state.
        py::gil_scoped_release nogil;
        return monitor::evaluate(*reference, state, o);
      },
      py::arg("monitor_or_reference"), py::arg("state"), py::kw_only(), py::arg("psi_warn") = 0.1,
      py::arg("psi_alert") = 0.25, py::arg("alpha") = 0.05, py::arg("correction") = "benjamini-hochberg",
      py::arg("eps") = 1e-4,
      "Drift statistics of `state` against the reference (a Reference, or a Monitor's current one) and the verdict.");
}

}  // namespace conveyor::bindings
