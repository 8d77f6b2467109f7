// conveyor._core.drift: the drift statistics of conveyor/drift.h over numpy arrays, for
// the monitor's Python side and for tests.
//
// Conversion only: each function checks dtype (float64 ref_p/edges/p, uint64 counts),
// contiguity and shape, raising InvalidInput that names the argument, then calls the core.
// The GIL stays held: every call is a few microseconds, less than releasing it costs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "conveyor/drift.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

[[noreturn]] void invalid(const char* fn, const std::string& what) {
  throw Error(ErrorCode::kInvalidInput, std::string("[drift] ") + fn + ": " + what);
}

// A C-contiguous, aligned, 1-D numpy array of `dtype` (borrowed: the caller's handle keeps
// it alive for the call).
template <typename T>
const T* vector_of(py::handle obj, const char* fn, const char* name, DType dtype, size_t& length) {
  const std::string what = std::string("[drift] ") + fn + ": " + name;
  const Tensor t = borrow_array(obj, what.c_str());
  if (t.dtype != dtype) {
    invalid(fn, std::string(name) + " must have dtype " + py::str(numpy_dtype(dtype)).cast<std::string>() + ", got " +
                    py::str(py::reinterpret_borrow<py::array>(obj).dtype()).cast<std::string>() +
                    ": convert it with .astype(np." + py::str(numpy_dtype(dtype)).cast<std::string>() + ")");
  }
  if (t.shape.ndim() != 1) {
    invalid(fn, std::string(name) + " must be one-dimensional, got shape " + t.shape.to_string());
  }
  if (reinterpret_cast<std::uintptr_t>(t.data) % alignof(T) != 0) {
    invalid(fn, std::string(name) + " is not aligned to its dtype: copy it (np.array(" + name + "))");
  }
  length = static_cast<size_t>(t.shape[0]);
  return static_cast<const T*>(t.data);
}

// The reference probabilities and window counts of one feature: same length, >= 1 bin.
struct Binned {
  const double* ref_p = nullptr;
  const uint64_t* counts = nullptr;
  size_t bins = 0;
};

Binned binned(py::handle ref_p, py::handle counts, const char* fn) {
  Binned b;
  size_t count_bins = 0;
  b.ref_p = vector_of<double>(ref_p, fn, "ref_p", DType::kFloat64, b.bins);
  b.counts = vector_of<uint64_t>(counts, fn, "counts", DType::kUInt64, count_bins);
  if (b.bins == 0) invalid(fn, "ref_p is empty: a feature has at least one bin");
  if (count_bins != b.bins) {
    invalid(fn, "counts must have one entry per bin of ref_p (" + std::to_string(b.bins) + "), got " +
                    std::to_string(count_bins));
  }
  return b;
}

drift::Correction correction_from_name(const std::string& name) {
  if (name == "none") return drift::Correction::kNone;
  if (name == "bonferroni") return drift::Correction::kBonferroni;
  if (name == "benjamini-hochberg") return drift::Correction::kBenjaminiHochberg;
  invalid("adjust_p_values", "correction must be 'benjamini-hochberg', 'bonferroni' or 'none', got '" + name + "'");
}

std::string repr(const drift::KsResult& r) {
  return "KsResult(statistic=" + py::repr(py::float_(r.statistic)).cast<std::string>() +
         ", error_bound=" + py::repr(py::float_(r.error_bound)).cast<std::string>() +
         ", p_value=" + py::repr(py::float_(r.p_value)).cast<std::string>() + ")";
}

std::string repr(const drift::ChiSquaredResult& r) {
  return "ChiSquaredResult(statistic=" + py::repr(py::float_(r.statistic)).cast<std::string>() +
         ", dof=" + py::repr(py::float_(r.dof)).cast<std::string>() +
         ", p_value=" + py::repr(py::float_(r.p_value)).cast<std::string>() + ")";
}

}  // namespace

void init_drift(py::module_& m) {
  using namespace pybind11::literals;
  py::module_ d = m.def_submodule(
      "drift", "Drift statistics between a binned reference and a window of counts (private; see conveyor/drift.h).");

  py::class_<drift::KsResult>(d, "KsResult", "Binned two-sample Kolmogorov-Smirnov result.")
      .def_readonly("statistic", &drift::KsResult::statistic, "D_b: max |F_ref - F_window| over the bin edges.")
      .def_readonly("error_bound", &drift::KsResult::error_bound,
                    "D_b <= D <= D_b + error_bound, D the exact statistic of the raw samples.")
      .def_readonly("p_value", &drift::KsResult::p_value, "Asymptotic Kolmogorov p-value of D_b.")
      .def("__repr__", [](const drift::KsResult& r) { return repr(r); });
  py::class_<drift::ChiSquaredResult>(d, "ChiSquaredResult", "Pearson chi-squared goodness-of-fit result.")
      .def_readonly("statistic", &drift::ChiSquaredResult::statistic, "Sum of (observed - expected)^2 / expected.")
      .def_readonly("dof", &drift::ChiSquaredResult::dof, "Degrees of freedom: bins - 1.")
      .def_readonly("p_value", &drift::ChiSquaredResult::p_value, "P(chi2(dof) > statistic).")
      .def("__repr__", [](const drift::ChiSquaredResult& r) { return repr(r); });

  d.def(
      "psi",
      [](py::handle ref_p, py::handle counts, double eps) {
        const Binned b = binned(ref_p, counts, "psi");
        return drift::psi(b.ref_p, b.counts, b.bins, eps);
      },
      "ref_p"_a, "counts"_a, "eps"_a,
      "Population stability index of the window counts against the reference probabilities, both smoothed by eps.");
  d.def(
      "js_distance",
      [](py::handle ref_p, py::handle counts) {
        const Binned b = binned(ref_p, counts, "js_distance");
        return drift::js_distance(b.ref_p, b.counts, b.bins);
      },
      "ref_p"_a, "counts"_a, "Jensen-Shannon distance (base 2, 0..1) between the reference and window proportions.");
  d.def(
      "ks_binned",
      [](py::handle ref_p, py::handle counts, int64_t ref_rows) {
        const Binned b = binned(ref_p, counts, "ks_binned");
        if (ref_rows < 0) {
          invalid("ks_binned", "ref_rows must be >= 0 (0: an exact reference), got " + std::to_string(ref_rows));
        }
        return drift::ks_binned(b.ref_p, b.counts, b.bins, static_cast<uint64_t>(ref_rows));
      },
      "ref_p"_a, "counts"_a, "ref_rows"_a,
      "Binned two-sample Kolmogorov-Smirnov: KsResult(statistic, error_bound, p_value).");
  d.def(
      "wasserstein_binned",
      [](py::handle edges, py::handle ref_p, py::handle counts, double lo, double hi, double scale) {
        const Binned b = binned(ref_p, counts, "wasserstein_binned");
        size_t edge_count = 0;
        const double* e = vector_of<double>(edges, "wasserstein_binned", "edges", DType::kFloat64, edge_count);
        if (edge_count + 1 != b.bins) {
          invalid("wasserstein_binned", "edges must hold bins - 1 (" + std::to_string(b.bins - 1) +
                                            ") inner edges for the bins of ref_p, got " + std::to_string(edge_count));
        }
        return drift::wasserstein_binned(e, b.ref_p, b.counts, b.bins, lo, hi, scale);
      },
      "edges"_a, "ref_p"_a, "counts"_a, "lo"_a, "hi"_a, "scale"_a,
      "First Wasserstein distance between the binned distributions (mass at bin midpoints), divided by scale.");
  d.def(
      "chi_squared",
      [](py::handle ref_p, py::handle counts, double eps) {
        const Binned b = binned(ref_p, counts, "chi_squared");
        return drift::chi_squared(b.ref_p, b.counts, b.bins, eps);
      },
      "ref_p"_a, "counts"_a, "eps"_a,
      "Pearson goodness of fit of the counts against the eps-smoothed reference: ChiSquaredResult.");
  d.def("kolmogorov_sf", py::vectorize(drift::kolmogorov_sf), "x"_a,
        "P(K > x), K the Kolmogorov distribution (elementwise over arrays).");
  d.def("chi2_sf", py::vectorize(drift::chi2_sf), "x"_a, "dof"_a,
        "P(X > x), X chi-squared with dof degrees of freedom (elementwise over arrays).");
  d.def(
      "adjust_p_values",
      [](py::handle p, const std::string& correction) {
        size_t n = 0;
        const double* values = vector_of<double>(p, "adjust_p_values", "p", DType::kFloat64, n);
        const drift::Correction c = correction_from_name(correction);
        py::array_t<double> adjusted(static_cast<py::ssize_t>(n));
        std::vector<size_t> scratch(n);
        drift::adjust_p_values(values, n, c, adjusted.mutable_data(), scratch.data());
        return adjusted;
      },
      "p"_a, "correction"_a,
      "Adjusted p-values ('benjamini-hochberg', 'bonferroni' or 'none'); NaN entries are skipped and stay NaN.");
}

}  // namespace conveyor::bindings
