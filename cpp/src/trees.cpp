// TreeEnsemble: importing Treelite's node arrays into the flat layout, and the per-batch
// walk that sums leaf values block by block (a block of rows stays in cache while every
// tree runs over it).
#include "conveyor/trees.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "conveyor/error.h"

namespace conveyor {

namespace {

[[noreturn]] void invalid(const std::string& what) {
  throw Error(ErrorCode::kInvalidInput, "[trees] " + what);
}

// Levels a tree's deepest leaf may lie below its average leaf and lockstep walks still pay:
// a lockstep step has no branch to mispredict, so it beats refilled lanes on LightGBM's
// leaf-wise trees (31 leaves, deepest 11-17, average about 6) and loses on deeper chains.
constexpr int64_t kLockstepSlack = 6;

constexpr float kInfinity = std::numeric_limits<float>::infinity();

// Rows walked through every tree before the next block starts: 128 rows of 32 features
// and their margins fit in L1 beside the hot upper levels of the trees.
constexpr int64_t kRowsPerBlock = 128;

// Trees a single row walks at once (add_row): enough independent chains of loads to hide
// their latency, few enough that every lane's node index stays in a register.
constexpr int kTreesPerGroup = 12;

// The float32 t' with (x <= t) == (x <= t') for every float32 x: the largest float <= t.
float float_at_most(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// The float32 t' with (x < t) == (x < t') for every float32 x: the smallest float >= t.
float float_at_least(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// A float's place in the order of floats as a uint32: a < b == order_key(a) < order_key(b)
// for every float that is not NaN (-0 and +0 both map to +0's key). Keys of numbers lie
// strictly between 0 and UINT32_MAX (order_key(-inf) is 0x007fffff, order_key(+inf) 0xff800000).
uint32_t order_key(float v) {
  if (v == 0.0f) v = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Keys of a NaN in add_row: below every threshold's key (the test holds: left) or at least
// every one (right). Leaves hold kLeafThreshold, which no key is below: a lane on a leaf
// steps to `right`, the leaf itself.
constexpr uint32_t kNanLeft = 0;
constexpr uint32_t kNanRight = std::numeric_limits<uint32_t>::max();
constexpr uint32_t kLeafThreshold = 0;

double sigmoid(double alpha, double margin) { return 1.0 / (1.0 + std::exp(-alpha * margin)); }

}  // namespace

TreePostprocessor tree_postprocessor_from_name(std::string_view name) {
  static const std::pair<std::string_view, TreePostprocessor> kNames[] = {
      {"identity", TreePostprocessor::kIdentity},
      {"identity_multiclass", TreePostprocessor::kIdentityMulticlass},
      {"sigmoid", TreePostprocessor::kSigmoid},
      {"multiclass_ova", TreePostprocessor::kMulticlassOva},
      {"softmax", TreePostprocessor::kSoftmax},
      {"exponential", TreePostprocessor::kExponential},
      {"exponential_standard_ratio", TreePostprocessor::kExponentialStandardRatio},
      {"logarithm_one_plus_exp", TreePostprocessor::kLogarithmOnePlusExp},
      {"signed_square", TreePostprocessor::kSignedSquare},
      {"hinge", TreePostprocessor::kHinge},
  };
  std::string known;
  for (const auto& [text, value] : kNames) {
    if (text == name) return value;
    known += known.empty() ? "" : ", ";
    known += text;
  }
  invalid("unsupported postprocessor '" + std::string(name) + "': expected one of " + known);
}

TreeOutput tree_output_from_name(std::string_view name) {
  if (name == "probabilities") return TreeOutput::kProbabilities;
  if (name == "label") return TreeOutput::kLabel;
  if (name == "raw_margin") return TreeOutput::kRawMargin;
  if (name == "leaf_ids") return TreeOutput::kLeafIds;
  if (name == "prediction") return TreeOutput::kPrediction;
  if (name == "class_index") return TreeOutput::kClassIndex;
  if (name == "prediction_column") return TreeOutput::kPredictionColumn;
  invalid("unknown output '" + std::string(name) +
          "': expected probabilities, label, raw_margin, leaf_ids, prediction, class_index or prediction_column");
}

TreeEnsemble::TreeEnsemble(TreeEnsembleHeader header, std::shared_ptr<MemoryPool> pool)
    : header_(std::move(header)), pool_(pool ? std::move(pool) : MemoryPool::default_host()) {
  if (header_.num_feature < 1) invalid("num_feature must be >= 1, got " + std::to_string(header_.num_feature));
  if (header_.num_margin < 1) invalid("num_margin must be >= 1, got " + std::to_string(header_.num_margin));
  if (static_cast<int64_t>(header_.base_scores.size()) != header_.num_margin) {
    invalid("expected " + std::to_string(header_.num_margin) + " base scores (one per margin), got " +
            std::to_string(header_.base_scores.size()));
  }
}

void TreeEnsemble::add_tree(const TreeArrays& tree) {
  if (finalized_) invalid("add_tree after finalize");
  const std::string where = "tree " + std::to_string(tree_roots_.size());
  const int32_t n = tree.num_nodes;
  const int32_t margins = header_.num_margin;
  if (n < 1) invalid(where + ": expected at least one node");
  if (tree.leaf_vector_begin != nullptr && tree.leaf_vector_end != nullptr) {
    for (int32_t i = 0; i < n; ++i) {
      if (tree.leaf_vector_end[i] > tree.leaf_vector_size || tree.leaf_vector_begin[i] > tree.leaf_vector_end[i]) {
        invalid(where + " node " + std::to_string(i) + ": leaf vector range outside the leaf_vector array");
      }
    }
  }
  if (tree.class_id < -1 || tree.class_id >= margins) {
    invalid(where + ": class_id " + std::to_string(tree.class_id) + " outside [-1, " + std::to_string(margins) + ")");
  }
  // A tree adding to every margin of a multi-margin model needs a vector in every leaf.
  const int32_t leaf_width = (tree.class_id == -1 && margins > 1) ? margins : 1;
  std::vector<Node> laid;  // the tree in its new order; indices relative to its root
  std::vector<Leaf> leaves;
  std::vector<double> values;
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  struct Pending {
    int32_t id, slot, depth;  // Treelite node, its new slot, splits above it
  };
  std::vector<Pending> stack{{0, 0, 0}};
  int32_t depth = 0, shallowest = std::numeric_limits<int32_t>::max();
  int64_t leaf_depth_sum = 0, leaf_count = 0;
  laid.resize(1);
  leaves.resize(1);
  while (!stack.empty()) {
    const auto [id, slot, level] = stack.back();
    stack.pop_back();
    // Named only when something is wrong: most models have many thousand nodes.
    auto node = [&, id = id] { return where + " node " + std::to_string(id); };
    if (seen[id]) invalid(node() + ": reached twice (the child arrays do not form a tree)");
    seen[id] = 1;
    Node out{};
    if (tree.cleft[id] == -1) {
      const uint64_t begin = tree.leaf_vector_begin ? tree.leaf_vector_begin[id] : 0;
      const uint64_t end = tree.leaf_vector_end ? tree.leaf_vector_end[id] : 0;
      const uint64_t width = end > begin ? end - begin : 0;
      if (width != 0 && (tree.leaf_vector == nullptr || width != static_cast<uint64_t>(leaf_width))) {
        invalid(node() + ": a leaf vector of " + std::to_string(width) + " values, expected " +
                std::to_string(leaf_width) + (leaf_width == 1 ? " (the tree adds to one margin)" : " (one per margin)"));
      }
      if (width == 0 && leaf_width != 1) {
        invalid(node() + ": a scalar leaf in a tree that adds to all " + std::to_string(margins) + " margins");
      }
      out.feature = 0;
      out.left = slot;
      out.internal = 0;
      leaves[slot] = Leaf{static_cast<int32_t>(leaf_values_.size() + values.size()), id};
      depth = std::max(depth, level);
      shallowest = std::min(shallowest, level);
      leaf_depth_sum += level;
      ++leaf_count;
      if (width == 0) {
        values.push_back(tree.leaf_value[id]);
      } else {
        values.insert(values.end(), tree.leaf_vector + begin, tree.leaf_vector + end);
      }
      laid[slot] = out;
      continue;
    }
    const int32_t left = tree.cleft[id], right = tree.cright[id], feature = tree.split_index[id];
    if (left <= 0 || left >= n || right <= 0 || right >= n || left == right) {
      invalid(node() + ": child indices " + std::to_string(left) + ", " + std::to_string(right) + " outside [1, " +
              std::to_string(n) + ")");
    }
    if (feature < 0 || feature >= header_.num_feature) {
      invalid(node() + ": feature " + std::to_string(feature) + " outside [0, " + std::to_string(header_.num_feature) + ")");
    }
    const double t = tree.threshold[id];
    if (std::isnan(t)) invalid(node() + ": threshold is NaN");
    // Every test becomes `x < threshold` on float32; `yes` is the child it sends a number
    // to when it holds. x > t is !(x <= t) and x >= t is !(x < t) for numbers (NaN takes
    // the default either way), and x <= t' is x < (the next float after t').
    int32_t yes = left, no = right;
    const auto cmp = static_cast<TreeCompare>(tree.cmp[id]);
    if (cmp != TreeCompare::kLess && cmp != TreeCompare::kLessEqual && cmp != TreeCompare::kGreater &&
        cmp != TreeCompare::kGreaterEqual) {
      invalid(node() + ": comparison code " + std::to_string(tree.cmp[id]) +
              " unsupported (expected <, <=, > or >=; categorical splits are not supported)");
    }
    if (cmp == TreeCompare::kGreater || cmp == TreeCompare::kGreaterEqual) std::swap(yes, no);
    const bool less_equal = cmp == TreeCompare::kLessEqual || cmp == TreeCompare::kGreater;
    out.threshold = less_equal ? float_at_most(t) : float_at_least(t);
    if (less_equal) {
      if (out.threshold < kInfinity) {
        out.threshold = std::nextafter(out.threshold, kInfinity);
      } else {
        // x <= +inf holds for every number, and x < -inf for none: swap the children.
        out.threshold = -kInfinity;
        std::swap(yes, no);
      }
    }
    out.feature = feature;
    out.left = static_cast<int32_t>(laid.size());
    out.internal = 1;
    const int32_t default_child = tree.default_left[id] ? left : right;
    out.default_left = default_child == yes ? 1 : 0;
    laid.resize(laid.size() + 2);
    leaves.resize(laid.size());
    laid[slot] = out;
    stack.push_back({no, out.left + 1, level + 1});
    stack.push_back({yes, out.left, level + 1});
  }
  constexpr size_t kMaxIndex = static_cast<size_t>(std::numeric_limits<int32_t>::max());
  if (nodes_.size() + laid.size() > kMaxIndex || leaf_values_.size() + values.size() > kMaxIndex) {
    invalid(where + ": the ensemble would exceed 2^31 nodes or leaf values");
  }
  const int32_t root = static_cast<int32_t>(nodes_.size());
  for (Node& node : laid) node.left += root;
  nodes_.insert(nodes_.end(), laid.begin(), laid.end());
  leaves_.insert(leaves_.end(), leaves.begin(), leaves.end());
  leaf_values_.insert(leaf_values_.end(), values.begin(), values.end());
  tree_roots_.push_back(root);
  tree_class_.push_back(tree.class_id);
  tree_depth_.push_back(depth);
  tree_shallowest_.push_back(shallowest);
  // Walked in lockstep when that wastes little: its deepest leaf at most a few levels
  // below the average leaf (depth-wise growth, as XGBoost's, has every leaf at one depth).
  tree_lockstep_.push_back(depth <= leaf_depth_sum / leaf_count + kLockstepSlack ? 1 : 0);
}

void TreeEnsemble::finalize(std::vector<TreeOutput> outputs, bool classifier) {
  if (finalized_) invalid("finalize called twice");
  if (tree_roots_.empty()) invalid("the ensemble has no trees");
  for (TreeOutput output : outputs) {
    const bool for_classifiers = output == TreeOutput::kProbabilities || output == TreeOutput::kLabel ||
                                 output == TreeOutput::kClassIndex;
    if (for_classifiers && !classifier) {
      invalid("probabilities, label and class_index are outputs of classifiers; this model is a regressor "
              "(use prediction)");
    }
    const bool for_regressors = output == TreeOutput::kPrediction || output == TreeOutput::kPredictionColumn;
    if (for_regressors && (classifier || header_.num_margin != 1)) {
      invalid("prediction is the output of a regressor with one margin (use probabilities or raw_margin)");
    }
  }
  const int32_t margins = header_.num_margin;
  margin_scale_.assign(static_cast<size_t>(margins), 1.0);
  if (header_.average_tree_output) {
    std::vector<int64_t> trees_per_margin(static_cast<size_t>(margins), 0);
    for (int32_t cls : tree_class_) {
      for (int32_t k = 0; k < margins; ++k) trees_per_margin[k] += (cls == -1 || cls == k) ? 1 : 0;
    }
    for (int32_t k = 0; k < margins; ++k) {
      if (trees_per_margin[k] > 0) margin_scale_[k] = 1.0 / static_cast<double>(trees_per_margin[k]);
    }
  }
  for (size_t first = 0; first < tree_depth_.size(); first += kTreesPerGroup) {
    const size_t last = std::min(tree_depth_.size(), first + kTreesPerGroup);
    group_depth_.push_back(*std::max_element(tree_depth_.begin() + first, tree_depth_.begin() + last));
    group_unchecked_.push_back(*std::max_element(tree_shallowest_.begin() + first, tree_shallowest_.begin() + last));
  }
  row_nodes_.resize(nodes_.size());
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const Node& node = nodes_[i];
    RowNode& out = row_nodes_[i];
    if (node.internal) {
      out.threshold = order_key(node.threshold);
      out.column = node.feature + (node.default_left ? header_.num_feature : 0);
      out.right = node.left + 1;
    } else {
      out.threshold = kLeafThreshold;
      out.column = 0;
      out.right = static_cast<int32_t>(i);
    }
  }
  if (header_.num_margin == 1) {
    node_value_.assign(nodes_.size(), 0.0);
    for (size_t i = 0; i < nodes_.size(); ++i) {
      if (!nodes_[i].internal) node_value_[i] = leaf_values_[leaves_[i].value_index];
    }
  }
  const Node* leaf = std::find_if(nodes_.data(), nodes_.data() + nodes_.size(), [](const Node& n) { return !n.internal; });
  idle_leaf_ = static_cast<int32_t>(leaf - nodes_.data());  // every tree has a leaf
  outputs_ = std::move(outputs);
  classifier_ = classifier;
  finalized_ = true;
}

int32_t TreeEnsemble::num_class() const noexcept {
  return header_.num_margin == 1 && classifier_ ? 2 : header_.num_margin;
}

// One step of a walk: the child a row goes to from `node` (a leaf stays where it is).
inline int32_t TreeEnsemble::step(const Node& node, const float* row) noexcept {
  const float x = row[node.feature];
  // A NaN fails both comparisons, so only the default can send it to `left`.
  const bool holds = x < node.threshold;
  const bool yes = holds | (std::isnan(x) & (node.default_left != 0));
  return node.left + static_cast<int32_t>(!yes & (node.internal != 0));
}

template <int kLanes>
void TreeEnsemble::walk_lockstep(int32_t tree, const float* x, int64_t count, int32_t* reached) const noexcept {
  const Node* nodes = nodes_.data();
  const int64_t features = header_.num_feature;
  const int32_t depth = tree_depth_[tree];
  for (int64_t first = 0; first + kLanes <= count; first += kLanes) {
    int32_t at[kLanes];
    for (int l = 0; l < kLanes; ++l) at[l] = tree_roots_[tree];
    // Every lane takes `depth` steps: no branch depends on the data.
    for (int32_t level = 0; level < depth; ++level) {
      for (int l = 0; l < kLanes; ++l) at[l] = step(nodes[at[l]], x + (first + l) * features);
    }
    for (int l = 0; l < kLanes; ++l) reached[first + l] = at[l];
  }
}

template <int kLanes>
void TreeEnsemble::walk_refill(int32_t tree, const float* x, int64_t count, int32_t* reached) const noexcept {
  const Node* nodes = nodes_.data();
  const int64_t features = header_.num_feature;
  const int32_t root = tree_roots_[tree];
  int32_t at[kLanes];
  int64_t row[kLanes];
  const float* data[kLanes];
  int64_t next = 0;
  int active = 0;
  for (int l = 0; l < kLanes; ++l) {
    at[l] = root;
    row[l] = next < count ? next++ : -1;
    data[l] = x + std::max<int64_t>(row[l], 0) * features;
    active += row[l] >= 0;
  }
  while (active > 0) {
    for (int l = 0; l < kLanes; ++l) {
      const Node& node = nodes[at[l]];
      if (node.internal) {
        at[l] = step(node, data[l]);
        continue;
      }
      if (row[l] < 0) continue;
      // This row is done: the lane takes the next one, or stays on the leaf when none is left.
      reached[row[l]] = at[l];
      row[l] = next < count ? next++ : -1;
      if (row[l] < 0) {
        --active;
        continue;
      }
      at[l] = root;
      data[l] = x + row[l] * features;
    }
  }
}

inline void TreeEnsemble::add_leaf(double* margin, int32_t tree, int32_t node, int32_t* leaf_ids) const noexcept {
  const Leaf& leaf = leaves_[node];
  const double* value = &leaf_values_[leaf.value_index];
  const int32_t width = header_.num_margin;
  const int32_t cls = tree_class_[tree];
  if (cls == -1 && width > 1) {
    for (int32_t k = 0; k < width; ++k) margin[k] += value[k];
  } else {
    margin[cls < 0 ? 0 : cls] += value[0];
  }
  if (leaf_ids != nullptr) leaf_ids[tree] = leaf.node_id;
}

void TreeEnsemble::add_row(const float* row, double* margin, int32_t* leaf_ids) const {
  constexpr int kLanes = kTreesPerGroup;
  const int32_t features = header_.num_feature;
  // The row as order keys twice: columns [0, features) send NaN right, [features, 2 *
  // features) send it left (RowNode::column picks one per node).
  constexpr int32_t kStackKeys = 1024;
  uint32_t stack_keys[kStackKeys];
  std::unique_ptr<uint32_t[]> heap_keys;
  uint32_t* keys = stack_keys;
  if (2 * features > kStackKeys) {
    heap_keys = std::make_unique<uint32_t[]>(2 * static_cast<size_t>(features));
    keys = heap_keys.get();
  }
  for (int32_t f = 0; f < features; ++f) {
    const float v = row[f];
    const bool nan = std::isnan(v);
    const uint32_t key = order_key(nan ? 0.0f : v);
    keys[f] = nan ? kNanRight : key;
    keys[features + f] = nan ? kNanLeft : key;
  }
  const RowNode* nodes = row_nodes_.data();
  const int32_t* roots = tree_roots_.data();
  const int32_t trees = num_tree();
  // One margin: every tree adds its leaf's one value to it.
  const int32_t width = header_.num_margin;
  double sum = margin[0];
  for (int32_t first = 0; first < trees; first += kLanes) {
    const int32_t count = std::min<int32_t>(kLanes, trees - first);
    int32_t at[kLanes];
    for (int l = 0; l < kLanes; ++l) at[l] = l < count ? roots[first + l] : idle_leaf_;
    // The next group's roots load while this group walks.
    for (int32_t t = first + kLanes; t < std::min(trees, first + 2 * kLanes); ++t) {
      __builtin_prefetch(nodes + roots[t]);
    }
    const int32_t depth = group_depth_[first / kLanes];
    // No lane reaches a leaf before `unchecked` levels (its tree's shallowest leaf): those
    // steps need no check.
    const int32_t unchecked = group_unchecked_[first / kLanes];
    for (int32_t level = 0; level < unchecked; ++level) {
      for (int l = 0; l < kLanes; ++l) {
        const RowNode& node = nodes[at[l]];
        at[l] = node.right - (keys[node.column] < node.threshold);
      }
    }
    for (int32_t level = unchecked; level < depth; ++level) {
      // A step from an internal node always moves; from a leaf it never does.
      int32_t moved = 0;
      for (int l = 0; l < kLanes; ++l) {
        const RowNode& node = nodes[at[l]];
        const int32_t next = node.right - (keys[node.column] < node.threshold);
        moved |= next ^ at[l];
        at[l] = next;
      }
      if (moved == 0) break;  // every lane stood on its leaf (and stays there)
    }
    if (width == 1) {
      // A local sum keeps the adds (in tree order) off a chain through memory.
      for (int32_t l = 0; l < count; ++l) sum += node_value_[at[l]];
      if (leaf_ids != nullptr) {
        for (int32_t l = 0; l < count; ++l) leaf_ids[first + l] = leaves_[at[l]].node_id;
      }
    } else {
      for (int32_t l = 0; l < count; ++l) add_leaf(margin, first + l, at[l], leaf_ids);
    }
  }
  if (width == 1) margin[0] = sum;
}

void TreeEnsemble::margins(const float* x, int64_t rows, double* margins, int32_t* leaf_ids) const {
  if (!finalized_) invalid("run before finalize");
  constexpr int kLanes = 8;
  const int64_t features = header_.num_feature;
  const int32_t width = header_.num_margin;
  const int32_t trees = num_tree();
  int32_t reached[kRowsPerBlock];
  std::fill(margins, margins + rows * width, 0.0);
  auto ids = [&](int64_t r) { return leaf_ids != nullptr ? leaf_ids + r * trees : nullptr; };
  for (int64_t begin = 0; begin < rows; begin += kRowsPerBlock) {
    const int64_t count = std::min(rows - begin, kRowsPerBlock);
    // Whole groups of kLanes rows go tree by tree, lanes over rows; the few rows left
    // (all of a small batch) go row by row, lanes over trees.
    const int64_t grouped = count - count % kLanes;
    const float* block = x + begin * features;
    for (int32_t t = 0; grouped > 0 && t < trees; ++t) {
      if (tree_lockstep_[t]) {
        walk_lockstep<kLanes>(t, block, grouped, reached);
      } else {
        walk_refill<kLanes>(t, block, grouped, reached);
      }
      if (width == 1 && leaf_ids == nullptr) {
        for (int64_t r = 0; r < grouped; ++r) margins[begin + r] += node_value_[reached[r]];
      } else {
        for (int64_t r = 0; r < grouped; ++r) add_leaf(margins + (begin + r) * width, t, reached[r], ids(begin + r));
      }
    }
    for (int64_t r = begin + grouped; r < begin + count; ++r) {
      add_row(x + r * features, margins + r * width, ids(r));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    double* acc = margins + r * width;
    for (int32_t k = 0; k < width; ++k) acc[k] = acc[k] * margin_scale_[k] + header_.base_scores[k];
  }
}

void TreeEnsemble::postprocess(const double* margin, float* out) const {
  const int32_t n = header_.num_margin;
  const double alpha = header_.sigmoid_alpha;
  double y[1];
  switch (header_.postprocessor) {
    case TreePostprocessor::kSoftmax: {
      const double top = *std::max_element(margin, margin + n);
      double sum = 0.0;
      for (int32_t k = 0; k < n; ++k) sum += std::exp(margin[k] - top);
      for (int32_t k = 0; k < n; ++k) out[k] = static_cast<float>(std::exp(margin[k] - top) / sum);
      return;
    }
    case TreePostprocessor::kMulticlassOva:
      for (int32_t k = 0; k < n; ++k) out[k] = static_cast<float>(sigmoid(alpha, margin[k]));
      return;
    case TreePostprocessor::kIdentity:
    case TreePostprocessor::kIdentityMulticlass:
      for (int32_t k = 0; k < n; ++k) out[k] = static_cast<float>(margin[k]);
      return;
    default:
      break;
  }
  // The rest map each margin on its own.
  for (int32_t k = 0; k < n; ++k) {
    const double m = margin[k];
    switch (header_.postprocessor) {
      case TreePostprocessor::kSigmoid: y[0] = sigmoid(alpha, m); break;
      case TreePostprocessor::kExponential: y[0] = std::exp(m); break;
      case TreePostprocessor::kExponentialStandardRatio: y[0] = std::exp2(-m / header_.ratio_c); break;
      case TreePostprocessor::kLogarithmOnePlusExp: y[0] = std::log1p(std::exp(m)); break;
      case TreePostprocessor::kSignedSquare: y[0] = m * std::fabs(m); break;
      case TreePostprocessor::kHinge: y[0] = m > 0.0 ? 1.0 : 0.0; break;
      default: y[0] = m; break;
    }
    out[k] = static_cast<float>(y[0]);
  }
}

std::vector<Tensor> TreeEnsemble::run(const std::vector<Tensor>& inputs) const {
  if (!finalized_) invalid("run before finalize");
  if (inputs.size() != 1) invalid("expected 1 input (features), got " + std::to_string(inputs.size()));
  const Tensor& x = inputs[0];
  if (x.dtype != DType::kFloat32 || x.shape.ndim() != 2 || x.shape[1] != header_.num_feature) {
    invalid("expected float32 features [rows, " + std::to_string(header_.num_feature) + "], got " +
            std::string(dtype_name(x.dtype)) + " " + x.shape.to_string());
  }
  const int64_t rows = x.shape[0];
  const int32_t width = header_.num_margin, classes = num_class(), trees = num_tree();
  const bool want_leaf_ids = std::find(outputs_.begin(), outputs_.end(), TreeOutput::kLeafIds) != outputs_.end();
  // Postprocessed values, [rows, classes] (a binary classifier's [1 - p, p]).
  const bool want_values = std::any_of(outputs_.begin(), outputs_.end(), [](TreeOutput o) {
    return o != TreeOutput::kRawMargin && o != TreeOutput::kLeafIds;
  });
  // One pooled block holds the margins and every output, each region 64-byte aligned: one
  // allocation per call, which matters at a row or two. The outputs keep it alive.
  const auto urows = static_cast<size_t>(rows);
  size_t end = 0;
  auto region = [&end](size_t bytes) {
    const size_t at = end;
    end += (bytes + 63) / 64 * 64;
    return at;
  };
  auto output_bytes = [&](TreeOutput output) -> size_t {
    switch (output) {
      case TreeOutput::kLabel: return urows * sizeof(int64_t);
      case TreeOutput::kClassIndex: return urows * sizeof(float);
      case TreeOutput::kRawMargin: return urows * static_cast<size_t>(width) * sizeof(float);
      default: return 0;  // views of the shared regions
    }
  };
  const size_t margin_at = region(urows * static_cast<size_t>(width) * sizeof(double));
  const size_t leaf_ids_at = want_leaf_ids ? region(urows * static_cast<size_t>(trees) * sizeof(int32_t)) : 0;
  const size_t values_at = want_values ? region(urows * static_cast<size_t>(classes) * sizeof(float)) : 0;
  const size_t outputs_at = end;
  for (TreeOutput output : outputs_) region(output_bytes(output));
  std::shared_ptr<Block> block = pool_->allocate(end);
  char* const base = static_cast<char*>(block->data);
  const Device device = pool_->device();
  auto tensor = [&](DType dtype, const Shape& shape, size_t at) {
    Tensor t;
    t.dtype = dtype;
    t.shape = shape;
    t.data = base + at;
    t.device = device;
    t.owner = block;
    return t;
  };

  double* margin = reinterpret_cast<double*>(base + margin_at);
  int32_t* leaf_ids = want_leaf_ids ? reinterpret_cast<int32_t*>(base + leaf_ids_at) : nullptr;
  margins(static_cast<const float*>(x.data), rows, margin, leaf_ids);
  float* p = reinterpret_cast<float*>(base + values_at);
  if (want_values) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = p + r * classes;
      if (classes == 2 && width == 1) {
        postprocess(margin + r, row + 1);
        row[0] = 1.0f - row[1];
      } else {
        postprocess(margin + r * width, row);
      }
    }
  }
  std::vector<Tensor> out;
  out.reserve(outputs_.size());
  end = outputs_at;
  for (TreeOutput output : outputs_) {
    const size_t at = region(output_bytes(output));
    switch (output) {
      case TreeOutput::kProbabilities: out.push_back(tensor(DType::kFloat32, Shape{rows, classes}, values_at)); break;
      case TreeOutput::kPrediction: out.push_back(tensor(DType::kFloat32, Shape{rows}, values_at)); break;
      case TreeOutput::kPredictionColumn: out.push_back(tensor(DType::kFloat32, Shape{rows, 1}, values_at)); break;
      case TreeOutput::kLabel: {
        int64_t* dst = reinterpret_cast<int64_t*>(base + at);
        for (int64_t r = 0; r < rows; ++r) {
          const float* row = p + r * classes;
          dst[r] = std::max_element(row, row + classes) - row;
        }
        out.push_back(tensor(DType::kInt64, Shape{rows}, at));
        break;
      }
      case TreeOutput::kClassIndex: {
        float* dst = reinterpret_cast<float*>(base + at);
        for (int64_t r = 0; r < rows; ++r) {
          const float* row = p + r * classes;
          dst[r] = static_cast<float>(std::max_element(row, row + classes) - row);
        }
        out.push_back(tensor(DType::kFloat32, Shape{rows, 1}, at));
        break;
      }
      case TreeOutput::kRawMargin: {
        float* dst = reinterpret_cast<float*>(base + at);
        for (int64_t i = 0; i < rows * width; ++i) dst[i] = static_cast<float>(margin[i]);
        out.push_back(tensor(DType::kFloat32, Shape{rows, width}, at));
        break;
      }
      case TreeOutput::kLeafIds: out.push_back(tensor(DType::kInt32, Shape{rows, trees}, leaf_ids_at)); break;
    }
  }
  return out;
}

Executor tree_ensemble_executor(std::shared_ptr<const TreeEnsemble> ensemble) {
  return [ensemble = std::move(ensemble)](const Batch& batch) { return ensemble->run(batch.inputs); };
}

}  // namespace conveyor
