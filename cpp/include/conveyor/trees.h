// The tree-ensemble evaluator: XGBoost, LightGBM and scikit-learn forests on flat arrays.
//
// The loader (python/conveyor/backends/trees.py) reads a model through Treelite once and
// describes it here: the ensemble's header (features, outputs, base scores, averaging,
// postprocessor) at construction, then each tree with add_tree() in Treelite's own node
// arrays, then finalize() naming the outputs run() returns. add_tree() re-lays each tree
// out so that a node's right child sits right after its left child and every test reads
// `x < t` on float32 (">" and ">=" swap the children, "x <= t" becomes "x < the next
// float"; float64 thresholds are rounded to the float32 that decides every float32 input
// the same way). After
// finalize() the ensemble is immutable and run() may be called from any number of
// threads at once without locks (the batcher's instances share one ensemble).
//
// Semantics (Treelite's GTIL): a NaN feature goes to the node's default child; a tree
// adds its leaf value to its class's margin (or its leaf vector to every class); margins
// are divided by the count of trees per class when averaging (random forests), then the
// base scores are added, then the postprocessor maps margins to the model's outputs.
//
// Errors: building throws Error(kInvalidInput) naming the tree and node ("[trees] ...");
// run() throws Error(kInvalidInput) when a batch is not float32 [rows, features].
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "conveyor/batcher.h"
#include "conveyor/memory_pool.h"
#include "conveyor/tensor.h"

namespace conveyor {

// Treelite's postprocessors (what turns summed margins into predictions).
enum class TreePostprocessor : uint8_t {
  kIdentity,                  // y = margin
  kIdentityMulticlass,        // y = margin, per class
  kSigmoid,                   // y = 1 / (1 + exp(-alpha * margin))
  kMulticlassOva,             // the sigmoid per class
  kSoftmax,                   // y = softmax over the classes
  kExponential,               // y = exp(margin)
  kExponentialStandardRatio,  // y = exp2(-margin / ratio_c)
  kLogarithmOnePlusExp,       // y = log(1 + exp(margin))
  kSignedSquare,              // y = sign(margin) * margin^2
  kHinge,                     // y = 1 if margin > 0 else 0
};

// Treelite's postprocessor name ("sigmoid", "softmax", ...); throws Error(kInvalidInput)
// listing the supported names for anything else.
TreePostprocessor tree_postprocessor_from_name(std::string_view name);

// Treelite's comparison operator codes (treelite/enum/operator.h).
enum class TreeCompare : int8_t { kLess = 2, kLessEqual = 3, kGreater = 4, kGreaterEqual = 5 };

// What run() can return, each in float32 unless said otherwise.
enum class TreeOutput : uint8_t {
  kProbabilities,  // [rows, classes]: postprocessed; a binary model's one margin becomes [1-p, p]
  kLabel,          // int64 [rows]: the argmax of the probabilities
  kRawMargin,      // [rows, margins]: summed leaf values (+ base scores), before the postprocessor
  kLeafIds,        // int32 [rows, trees]: the Treelite node id of the leaf each tree reached
  kPrediction,     // [rows]: a regressor's postprocessed single output
  // Triton FIL's output__0 forms, for its model repositories served unchanged:
  kClassIndex,        // [rows, 1]: a classifier's argmax as a float
  kPredictionColumn,  // [rows, 1]: a regressor's prediction as one column
};

// "probabilities", "label", "raw_margin", "leaf_ids", "prediction", "class_index",
// "prediction_column"; throws for others.
TreeOutput tree_output_from_name(std::string_view name);

struct TreeEnsembleHeader {
  int32_t num_feature = 0;
  int32_t num_margin = 1;            // margins per row (classes of a multi-class model, else 1)
  bool average_tree_output = false;  // divide each margin by the trees that add to it
  std::vector<double> base_scores;   // num_margin values, added after averaging
  TreePostprocessor postprocessor = TreePostprocessor::kIdentity;
  float sigmoid_alpha = 1.0f;
  float ratio_c = 1.0f;
};

// One tree in Treelite's arrays (TreeliteGetTreeField), node i at index i, root 0.
// Leaves: cleft[i] == -1. A leaf holds leaf_value[i], or, when leaf_vector_end[i] >
// leaf_vector_begin[i], num_margin values leaf_vector[begin, end). Internal nodes test
// feature split_index[i] against threshold[i] with cmp[i] (a TreeCompare code) and send
// NaN to cleft[i] when default_left[i], else to cright[i]. The pointers are read during
// add_tree() only.
struct TreeArrays {
  int32_t num_nodes = 0;
  const int32_t* cleft = nullptr;
  const int32_t* cright = nullptr;
  const int32_t* split_index = nullptr;
  const uint8_t* default_left = nullptr;
  const double* threshold = nullptr;
  const int8_t* cmp = nullptr;
  const double* leaf_value = nullptr;
  const double* leaf_vector = nullptr;  // may be null when no leaf has a vector
  uint64_t leaf_vector_size = 0;         // values in leaf_vector; every node's [begin, end) lies within
  const uint64_t* leaf_vector_begin = nullptr;
  const uint64_t* leaf_vector_end = nullptr;
  int32_t class_id = 0;  // the margin this tree adds to; -1: every margin (leaf vectors)
};

class TreeEnsemble {
 public:
  // Throws Error(kInvalidInput) when the header is inconsistent. pool null: the default host pool.
  explicit TreeEnsemble(TreeEnsembleHeader header, std::shared_ptr<MemoryPool> pool = nullptr);

  // ---- building (before finalize) ----
  // Copies and re-lays out one tree; checks every child index, feature and leaf.
  void add_tree(const TreeArrays& tree);
  // Ends building: `outputs` are what run() returns, in order. `classifier` decides the
  // shape of kProbabilities/kLabel (allowed only for a classifier) and kPrediction (only
  // for a regressor with one margin).
  void finalize(std::vector<TreeOutput> outputs, bool classifier);

  // ---- running (after finalize; thread-safe) ----
  // inputs: one float32 tensor [rows, num_feature]. Outputs own pooled memory.
  std::vector<Tensor> run(const std::vector<Tensor>& inputs) const;

  // The same evaluation into caller-owned arrays (tests, benchmarks): margins [rows,
  // num_margin] after base scores, and, when leaf_ids is not null, [rows, trees].
  void margins(const float* x, int64_t rows, double* margins, int32_t* leaf_ids) const;

  int32_t num_feature() const noexcept { return header_.num_feature; }
  int32_t num_margin() const noexcept { return header_.num_margin; }
  // Columns of kProbabilities: 2 for a binary model with one margin, else num_margin.
  int32_t num_class() const noexcept;
  int32_t num_tree() const noexcept { return static_cast<int32_t>(tree_roots_.size()); }
  size_t node_count() const noexcept { return nodes_.size(); }

 private:
  // 16 bytes. Internal: children at `left` (x < threshold holds) and `left + 1`. Leaf:
  // `left` is its own index and `internal` is 0, so a walk that goes on past a leaf stays
  // there (it reads feature 0 and ignores the answer); the walk needs no branch per node.
  struct Node {
    float threshold;
    int32_t feature;
    int32_t left;
    uint8_t default_left;  // NaN goes to `left`
    uint8_t internal;
  };
  // The node again for add_row, whose row is uint32 keys ordered as the floats are, twice
  // (NaN as the lowest key, then as the highest): one integer test per step, no NaN check.
  // Internal: children at `right - 1` (key < threshold) and `right`. Leaf: `right` is its
  // own index and no key is below `threshold`, so a lane there stays.
  struct RowNode {
    uint32_t threshold;  // order key of Node::threshold; a leaf's is 0
    int32_t column;      // feature, + num_feature when NaN goes left
    int32_t right;
  };
  // Per node, read once a walk ends there (leaves only).
  struct Leaf {
    int32_t value_index;  // into leaf_values_
    int32_t node_id;      // Treelite's node id (the leaf_ids output)
  };

  static int32_t step(const Node& node, const float* row) noexcept;
  // The leaf (node index) each of `count` rows of x reaches in `tree`, into reached[].
  // Both walk kLanes rows at once, so their chains of dependent loads overlap.
  // Lockstep: every lane takes `depth` steps, no data-dependent branch (trees whose leaves
  // lie at similar depths);
  // count is a multiple of kLanes.
  template <int kLanes>
  void walk_lockstep(int32_t tree, const float* x, int64_t count, int32_t* reached) const noexcept;
  // Refill: a lane that reaches its leaf takes the next row (trees whose deepest leaf lies
  // far below the average one, where lockstep would walk every row as deep as it).
  template <int kLanes>
  void walk_refill(int32_t tree, const float* x, int64_t count, int32_t* reached) const noexcept;
  // One row through every tree, adding each tree's leaf to `margin` (num_margin values)
  // in tree order and, when leaf_ids is not null, its node id to leaf_ids[t]. Trees go
  // kTreesPerGroup (trees.cpp) at a time in lockstep with no branch per tree: a group
  // stops at its deepest tree's depth, or sooner once every lane stands on a leaf (one
  // branch per level).
  void add_row(const float* row, double* margin, int32_t* leaf_ids) const;
  // Adds the leaf (node index) tree t reached to a row's margins and leaf ids.
  void add_leaf(double* margin, int32_t tree, int32_t node, int32_t* leaf_ids) const noexcept;
  void postprocess(const double* margin, float* probabilities) const;

  const TreeEnsembleHeader header_;
  const std::shared_ptr<MemoryPool> pool_;
  std::vector<Node> nodes_;
  std::vector<int32_t> tree_roots_;
  std::vector<int32_t> tree_class_;        // -1: the leaf vector adds to every margin
  std::vector<int32_t> tree_depth_;        // the longest root-to-leaf path, in splits
  std::vector<uint8_t> tree_lockstep_;     // walk it in lockstep (see kLockstepSlack in trees.cpp)
  std::vector<int32_t> tree_shallowest_;   // the shortest root-to-leaf path, in splits
  std::vector<int32_t> group_depth_;       // per group of trees (add_row): its deepest tree's depth
  std::vector<int32_t> group_unchecked_;   // per group: the deepest of its trees' shallowest leaves
  int32_t idle_leaf_ = 0;                  // a leaf: where add_row parks lanes with no tree
  std::vector<RowNode> row_nodes_;         // nodes_ again, for add_row
  std::vector<Leaf> leaves_;               // per node (same index as nodes_)
  std::vector<double> node_value_;         // one-margin models: per node, its leaf's value (add_row)
  std::vector<double> leaf_values_;        // per leaf: 1 value, or num_margin for trees adding to every margin
  std::vector<double> margin_scale_;       // per margin: 1 / trees adding to it when averaging
  std::vector<TreeOutput> outputs_;
  bool classifier_ = false;
  bool finalized_ = false;
};

// The batcher executor that runs `ensemble` on each batch's inputs directly: no Python, no GIL.
Executor tree_ensemble_executor(std::shared_ptr<const TreeEnsemble> ensemble);

}  // namespace conveyor
