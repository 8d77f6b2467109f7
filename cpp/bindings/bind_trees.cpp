// conveyor._core.TreeEnsemble: the loader in conveyor/backends/trees.py describes a
// Treelite model through these calls; the Batcher binding runs it without the GIL.
//
// Conversion only: node arrays are cast to the core's types and borrowed for the
// duration of add_tree() (which copies them), names become enums, and run() releases
// the GIL while the trees are walked.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "conveyor/trees.h"
#include "convert.h"

namespace conveyor::bindings {

namespace {

template <class T>
using Column = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
const T* column_data(const Column<T>& column, py::ssize_t expected, const char* name) {
  if (column.ndim() != 1 || column.shape(0) != expected) {
    throw Error(ErrorCode::kInvalidInput, std::string("[trees] ") + name + ": expected " + std::to_string(expected) +
                                              " values (one per node), got shape with " +
                                              std::to_string(column.size()) + " values");
  }
  return column.data();
}

}  // namespace

void init_trees(py::module_& m) {
  py::class_<TreeEnsemble, std::shared_ptr<TreeEnsemble>>(
      m, "TreeEnsemble",
      "A tree ensemble on flat arrays (XGBoost, LightGBM, scikit-learn through Treelite). Describe it with "
      "add_tree() per tree, then finalize(outputs, classifier); run() and the batcher may then use it from any "
      "thread.")
      .def(py::init([](int32_t num_feature, int32_t num_margin, bool average_tree_output,
                       std::vector<double> base_scores, const std::string& postprocessor, float sigmoid_alpha,
                       float ratio_c, std::shared_ptr<MemoryPool> pool) {
             TreeEnsembleHeader header;
             header.num_feature = num_feature;
             header.num_margin = num_margin;
             header.average_tree_output = average_tree_output;
             header.base_scores = std::move(base_scores);
             header.postprocessor = tree_postprocessor_from_name(postprocessor);
             header.sigmoid_alpha = sigmoid_alpha;
             header.ratio_c = ratio_c;
             return std::make_shared<TreeEnsemble>(std::move(header), std::move(pool));
           }),
           py::kw_only(), py::arg("num_feature"), py::arg("num_margin"), py::arg("average_tree_output"),
           py::arg("base_scores"), py::arg("postprocessor"), py::arg("sigmoid_alpha") = 1.0f,
           py::arg("ratio_c") = 1.0f, py::arg("pool") = nullptr)
      .def(
          "add_tree",
          [](TreeEnsemble& e, const Column<int32_t>& cleft, const Column<int32_t>& cright,
             const Column<int32_t>& split_index, const Column<uint8_t>& default_left, const Column<double>& threshold,
             const Column<int8_t>& cmp, const Column<double>& leaf_value, const Column<double>& leaf_vector,
             const Column<uint64_t>& leaf_vector_begin, const Column<uint64_t>& leaf_vector_end, int32_t class_id) {
            TreeArrays tree;
            const py::ssize_t n = cleft.ndim() == 1 ? cleft.shape(0) : -1;
            tree.num_nodes = static_cast<int32_t>(n);
            tree.cleft = column_data(cleft, n, "cleft");
            tree.cright = column_data(cright, n, "cright");
            tree.split_index = column_data(split_index, n, "split_index");
            tree.default_left = column_data(default_left, n, "default_left");
            tree.threshold = column_data(threshold, n, "threshold");
            tree.cmp = column_data(cmp, n, "cmp");
            tree.leaf_value = column_data(leaf_value, n, "leaf_value");
            tree.leaf_vector = leaf_vector.size() ? leaf_vector.data() : nullptr;
            tree.leaf_vector_begin = column_data(leaf_vector_begin, n, "leaf_vector_begin");
            tree.leaf_vector_end = column_data(leaf_vector_end, n, "leaf_vector_end");
            tree.leaf_vector_size = static_cast<uint64_t>(leaf_vector.size());
            tree.class_id = class_id;
            e.add_tree(tree);
          },
          py::arg("cleft"), py::arg("cright"), py::arg("split_index"), py::arg("default_left"), py::arg("threshold"),
          py::arg("cmp"), py::arg("leaf_value"), py::arg("leaf_vector"), py::arg("leaf_vector_begin"),
          py::arg("leaf_vector_end"), py::arg("class_id"),
          "Copy one tree given as Treelite's node arrays (TreeAccessor.get_field); cmp holds Treelite's operator "
          "codes (2 <, 3 <=, 4 >, 5 >=).")
      .def(
          "finalize",
          [](TreeEnsemble& e, const std::vector<std::string>& outputs, bool classifier) {
            std::vector<TreeOutput> kinds;
            for (const std::string& name : outputs) kinds.push_back(tree_output_from_name(name));
            e.finalize(std::move(kinds), classifier);
          },
          py::arg("outputs"), py::arg("classifier"),
          "End building; outputs: names among probabilities, label, raw_margin, leaf_ids, prediction.")
      .def(
          "run",
          [](const TreeEnsemble& e, const py::sequence& arrays) {
            // Borrowed: `arrays` outlives the call, and run() returns only memory of its own.
            std::vector<Tensor> inputs = borrow_arrays(arrays, "input");
            std::vector<Tensor> outputs;
            {
              // Pure tree walking on arrays this call holds.
              py::gil_scoped_release nogil;
              outputs = e.run(inputs);
            }
            return arrays_from_tensors(outputs);
          },
          py::arg("inputs"), "Run one batch: [float32 features [rows, num_feature]] in, the finalized outputs out.")
      .def_property_readonly("num_feature", &TreeEnsemble::num_feature)
      .def_property_readonly("num_margin", &TreeEnsemble::num_margin)
      .def_property_readonly("num_class", &TreeEnsemble::num_class)
      .def_property_readonly("num_tree", &TreeEnsemble::num_tree)
      .def_property_readonly("node_count", &TreeEnsemble::node_count);
}

}  // namespace conveyor::bindings
