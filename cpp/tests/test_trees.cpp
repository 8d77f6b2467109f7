// The tree-ensemble evaluator on small hand-built forests: comparison operators (with
// float64 thresholds), NaN default directions, multi-class and leaf-vector forests,
// averaging, postprocessors, leaf ids, argument errors, and concurrent runs.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "check.h"
#include "conveyor/error.h"
#include "conveyor/trees.h"

using namespace conveyor;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// A tree in Treelite's arrays, owning them; leaves have cleft == -1.
struct HandTree {
  std::vector<int32_t> cleft, cright, split_index;
  std::vector<uint8_t> default_left;
  std::vector<double> threshold;
  std::vector<int8_t> cmp;
  std::vector<double> leaf_value, leaf_vector;
  std::vector<uint64_t> begin, end;
  int32_t class_id = 0;

  int32_t split(int32_t feature, double t, TreeCompare op, bool nan_left) {
    return push(0, 0, feature, nan_left, t, static_cast<int8_t>(op), 0.0);
  }
  int32_t leaf(double value) { return push(-1, -1, -1, false, 0.0, 0, value); }
  int32_t vector_leaf(std::vector<double> values) {
    const int32_t id = leaf(0.0);
    begin[id] = leaf_vector.size();
    leaf_vector.insert(leaf_vector.end(), values.begin(), values.end());
    end[id] = leaf_vector.size();
    return id;
  }
  void children(int32_t node, int32_t left, int32_t right) {
    cleft[node] = left;
    cright[node] = right;
  }
  TreeArrays arrays() const {
    TreeArrays a;
    a.num_nodes = static_cast<int32_t>(cleft.size());
    a.cleft = cleft.data();
    a.cright = cright.data();
    a.split_index = split_index.data();
    a.default_left = default_left.data();
    a.threshold = threshold.data();
    a.cmp = cmp.data();
    a.leaf_value = leaf_value.data();
    a.leaf_vector = leaf_vector.empty() ? nullptr : leaf_vector.data();
    a.leaf_vector_size = leaf_vector.size();
    a.leaf_vector_begin = begin.data();
    a.leaf_vector_end = end.data();
    a.class_id = class_id;
    return a;
  }

 private:
  int32_t push(int32_t l, int32_t r, int32_t f, bool dl, double t, int8_t c, double v) {
    cleft.push_back(l);
    cright.push_back(r);
    split_index.push_back(f);
    default_left.push_back(dl ? 1 : 0);
    threshold.push_back(t);
    cmp.push_back(c);
    leaf_value.push_back(v);
    begin.push_back(0);
    end.push_back(0);
    return static_cast<int32_t>(cleft.size() - 1);
  }
};

// One split on feature 0: leaf 10 when the test holds (cleft), 20 otherwise.
HandTree stump(double t, TreeCompare op, bool nan_left) {
  HandTree tree;
  const int32_t root = tree.split(0, t, op, nan_left);
  const int32_t yes = tree.leaf(10.0), no = tree.leaf(20.0);
  tree.children(root, yes, no);
  return tree;
}

TreeEnsembleHeader header(int32_t features, int32_t margins, const char* post = "identity") {
  TreeEnsembleHeader h;
  h.num_feature = features;
  h.num_margin = margins;
  h.base_scores.assign(static_cast<size_t>(margins), 0.0);
  h.postprocessor = tree_postprocessor_from_name(post);
  return h;
}

// Margins of one-feature rows through a one-stump ensemble.
std::vector<double> stump_margins(const HandTree& tree, const std::vector<float>& x) {
  TreeEnsemble e(header(1, 1));
  e.add_tree(tree.arrays());
  e.finalize({TreeOutput::kRawMargin}, false);
  std::vector<double> out(x.size());
  e.margins(x.data(), static_cast<int64_t>(x.size()), out.data(), nullptr);
  return out;
}

Tensor borrow(std::vector<float>& data, int64_t rows, int64_t cols) {
  Tensor t;
  t.dtype = DType::kFloat32;
  t.shape = Shape{rows, cols};
  t.data = data.data();
  return t;
}

}  // namespace

TEST_CASE("trees: < and <= decide equal values differently, > and >= mirror them") {
  const std::vector<float> x = {0.5f, 1.0f, 2.0f};
  const auto less = stump_margins(stump(1.0, TreeCompare::kLess, false), x);
  const auto less_equal = stump_margins(stump(1.0, TreeCompare::kLessEqual, false), x);
  const auto greater = stump_margins(stump(1.0, TreeCompare::kGreater, false), x);
  const auto greater_equal = stump_margins(stump(1.0, TreeCompare::kGreaterEqual, false), x);
  CHECK_EQ(less[0], 10.0);
  CHECK_EQ(less[1], 20.0);
  CHECK_EQ(less[2], 20.0);
  CHECK_EQ(less_equal[1], 10.0);
  CHECK_EQ(less_equal[2], 20.0);
  CHECK_EQ(greater[0], 20.0);
  CHECK_EQ(greater[1], 20.0);
  CHECK_EQ(greater[2], 10.0);
  CHECK_EQ(greater_equal[0], 20.0);
  CHECK_EQ(greater_equal[1], 10.0);
}

TEST_CASE("trees: float64 thresholds decide float32 inputs as float64 comparisons do") {
  const double t = 0.1;  // not a float32: 0.1f is slightly above it
  const float above = 0.1f, below = std::nextafter(0.1f, 0.0f);
  CHECK(static_cast<double>(above) > t);
  CHECK(static_cast<double>(below) < t);
  const std::vector<float> x = {below, above};
  for (TreeCompare op : {TreeCompare::kLess, TreeCompare::kLessEqual}) {
    const auto m = stump_margins(stump(t, op, false), x);
    CHECK_EQ(m[0], 10.0);
    CHECK_EQ(m[1], 20.0);
  }
  for (TreeCompare op : {TreeCompare::kGreater, TreeCompare::kGreaterEqual}) {
    const auto m = stump_margins(stump(t, op, false), x);
    CHECK_EQ(m[0], 20.0);
    CHECK_EQ(m[1], 10.0);
  }
}

TEST_CASE("trees: NaN takes the default child whatever the operator") {
  const std::vector<float> x = {kNaN};
  for (TreeCompare op : {TreeCompare::kLess, TreeCompare::kLessEqual, TreeCompare::kGreater,
                         TreeCompare::kGreaterEqual}) {
    const double nan_left = stump_margins(stump(1.0, op, true), x)[0];
    const double nan_right = stump_margins(stump(1.0, op, false), x)[0];
    CHECK_EQ(nan_left, 10.0);    // cleft
    CHECK_EQ(nan_right, 20.0);   // cright
  }
}

TEST_CASE("trees: leaf ids are Treelite's node ids, in tree order") {
  // Node ids deliberately out of breadth-first order: 0 -> (3, 1), 1 -> (4, 2).
  HandTree tree;
  tree.cleft.resize(5, -1);
  tree.cright.resize(5, -1);
  tree.split_index = {0, 1, -1, -1, -1};
  tree.default_left = {0, 1, 0, 0, 0};
  tree.threshold = {0.0, 5.0, 0.0, 0.0, 0.0};
  tree.cmp = {2, 3, 0, 0, 0};
  tree.leaf_value = {0.0, 0.0, 2.0, 3.0, 4.0};
  tree.begin.assign(5, 0);
  tree.end.assign(5, 0);
  tree.children(0, 3, 1);
  tree.children(1, 4, 2);
  TreeEnsemble e(header(2, 1));
  e.add_tree(tree.arrays());
  e.add_tree(stump(0.0, TreeCompare::kLess, true).arrays());
  e.finalize({TreeOutput::kLeafIds, TreeOutput::kRawMargin}, false);
  std::vector<float> x = {-1.0f, 0.0f, 1.0f, 5.0f, 1.0f, 6.0f, 2.0f, kNaN};
  const auto out = e.run({borrow(x, 4, 2)});
  CHECK_EQ(out.size(), size_t{2});
  CHECK(out[0].dtype == DType::kInt32);
  const int32_t* ids = static_cast<const int32_t*>(out[0].data);
  const int32_t expected_ids[] = {3, 1, 4, 2, 2, 2, 4, 2};
  for (int i = 0; i < 8; ++i) CHECK_EQ(ids[i], expected_ids[i]);
  const float* margin = static_cast<const float*>(out[1].data);
  CHECK_EQ(margin[0], 13.0f);  // 3 + 10
  CHECK_EQ(margin[1], 24.0f);  // 5 <= 5: 4 + 20
  CHECK_EQ(margin[2], 22.0f);  // 2 + 20
  CHECK_EQ(margin[3], 24.0f);  // NaN takes node 1's default (left, 4); x0 = 2 is not < 0 (20)
}

TEST_CASE("trees: multi-class softmax sums each class's trees, adds base scores, argmax labels") {
  TreeEnsembleHeader h = header(1, 3, "softmax");
  h.base_scores = {0.5, 0.0, -0.5};
  TreeEnsemble e(h);
  for (int32_t k = 0; k < 3; ++k) {
    HandTree tree = stump(0.0, TreeCompare::kLess, false);
    tree.leaf_value[1] = k;        // x < 0
    tree.leaf_value[2] = 2.0 - k;  // otherwise
    tree.class_id = k;
    e.add_tree(tree.arrays());
  }
  e.finalize({TreeOutput::kProbabilities, TreeOutput::kLabel, TreeOutput::kRawMargin}, true);
  CHECK_EQ(e.num_class(), 3);
  std::vector<float> x = {-1.0f, 1.0f};
  const auto out = e.run({borrow(x, 2, 1)});
  const float* p = static_cast<const float*>(out[0].data);
  const int64_t* label = static_cast<const int64_t*>(out[1].data);
  const float* raw = static_cast<const float*>(out[2].data);
  const double margins[2][3] = {{0.5, 1.0, 1.5}, {2.5, 1.0, -0.5}};
  for (int r = 0; r < 2; ++r) {
    double sum = 0.0;
    for (double m : margins[r]) sum += std::exp(m);
    for (int k = 0; k < 3; ++k) {
      CHECK_EQ(raw[r * 3 + k], static_cast<float>(margins[r][k]));
      CHECK(std::fabs(p[r * 3 + k] - std::exp(margins[r][k]) / sum) < 1e-6);
    }
  }
  CHECK_EQ(label[0], int64_t{2});
  CHECK_EQ(label[1], int64_t{0});
}

TEST_CASE("trees: leaf-vector forests average their trees (random forests)") {
  TreeEnsembleHeader h = header(1, 3, "identity_multiclass");
  h.average_tree_output = true;
  TreeEnsemble e(h);
  for (double shift : {0.0, 0.2}) {
    HandTree tree;
    const int32_t root = tree.split(0, 0.0, TreeCompare::kLessEqual, false);
    const int32_t a = tree.vector_leaf({0.8 - shift, 0.2, shift}), b = tree.vector_leaf({0.0, 0.5, 0.5});
    tree.children(root, a, b);
    tree.class_id = -1;
    e.add_tree(tree.arrays());
  }
  e.finalize({TreeOutput::kProbabilities, TreeOutput::kLabel}, true);
  std::vector<float> x = {0.0f, 3.0f};
  const auto out = e.run({borrow(x, 2, 1)});
  const float* p = static_cast<const float*>(out[0].data);
  const float expected[] = {0.7f, 0.2f, 0.1f, 0.0f, 0.5f, 0.5f};
  for (int i = 0; i < 6; ++i) CHECK(std::fabs(p[i] - expected[i]) < 1e-6);
  CHECK_EQ(static_cast<const int64_t*>(out[1].data)[0], int64_t{0});
  CHECK_EQ(static_cast<const int64_t*>(out[1].data)[1], int64_t{1});  // a tie goes to the first class
}

TEST_CASE("trees: a binary sigmoid model gives [1 - p, p]; a regressor gives prediction [rows]") {
  TreeEnsembleHeader h = header(1, 1, "sigmoid");
  h.base_scores = {-1.0};
  TreeEnsemble binary(h);
  binary.add_tree(stump(0.0, TreeCompare::kLess, true).arrays());
  binary.finalize({TreeOutput::kProbabilities, TreeOutput::kLabel}, true);
  std::vector<float> x = {kNaN};
  auto out = binary.run({borrow(x, 1, 1)});
  const float p = static_cast<float>(1.0 / (1.0 + std::exp(-9.0)));
  CHECK(out[0].shape == (Shape{1, 2}));
  CHECK(std::fabs(static_cast<const float*>(out[0].data)[1] - p) < 1e-7);
  CHECK(std::fabs(static_cast<const float*>(out[0].data)[0] - (1.0f - p)) < 1e-7);
  CHECK_EQ(static_cast<const int64_t*>(out[1].data)[0], int64_t{1});

  TreeEnsemble regressor(header(1, 1, "exponential"));
  regressor.add_tree(stump(0.0, TreeCompare::kLess, false).arrays());
  regressor.finalize({TreeOutput::kPrediction}, false);
  out = regressor.run({borrow(x, 1, 1)});
  CHECK(out[0].shape == (Shape{1}));
  CHECK(std::fabs(static_cast<const float*>(out[0].data)[0] - std::exp(20.0f)) < 1e-7 * std::exp(20.0f));
}

TEST_CASE("trees: Triton FIL's forms: class_index and prediction_column are one float column") {
  TreeEnsembleHeader h = header(1, 1, "sigmoid");
  TreeEnsemble binary(h);
  binary.add_tree(stump(0.0, TreeCompare::kLess, true).arrays());  // margin 10 (x < 0 or NaN) or 20
  binary.finalize({TreeOutput::kClassIndex}, true);
  std::vector<float> x = {-1.0f, kNaN};
  auto out = binary.run({borrow(x, 2, 1)});
  CHECK(out[0].dtype == DType::kFloat32);
  CHECK(out[0].shape == (Shape{2, 1}));
  CHECK_EQ(static_cast<const float*>(out[0].data)[0], 1.0f);  // sigmoid(10) > 0.5: class 1
  CHECK_EQ(static_cast<const float*>(out[0].data)[1], 1.0f);

  TreeEnsembleHeader shifted = header(1, 1, "sigmoid");
  shifted.base_scores = {-15.0};  // margins -5 (x < 0) and 5: classes 0 and 1
  TreeEnsemble two_classes(shifted);
  two_classes.add_tree(stump(0.0, TreeCompare::kLess, true).arrays());
  two_classes.finalize({TreeOutput::kClassIndex}, true);
  std::vector<float> y = {-1.0f, 1.0f};
  out = two_classes.run({borrow(y, 2, 1)});
  CHECK_EQ(static_cast<const float*>(out[0].data)[0], 0.0f);
  CHECK_EQ(static_cast<const float*>(out[0].data)[1], 1.0f);

  TreeEnsemble regressor(header(1, 1));
  regressor.add_tree(stump(0.0, TreeCompare::kLess, false).arrays());
  regressor.finalize({TreeOutput::kPredictionColumn, TreeOutput::kPrediction}, false);
  out = regressor.run({borrow(y, 2, 1)});
  CHECK(out[0].shape == (Shape{2, 1}));
  CHECK(out[1].shape == (Shape{2}));
  CHECK_EQ(static_cast<const float*>(out[0].data)[0], 10.0f);
  CHECK_EQ(static_cast<const float*>(out[0].data)[1], 20.0f);
  // The forms are for their kind of model only.
  TreeEnsemble wrong(header(1, 1));
  wrong.add_tree(stump(0.0, TreeCompare::kLess, false).arrays());
  CHECK_THROWS_CODE(wrong.finalize({TreeOutput::kClassIndex}, false), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(tree_output_from_name("output__0"), ErrorCode::kInvalidInput);
  CHECK(tree_output_from_name("prediction_column") == TreeOutput::kPredictionColumn);
}

TEST_CASE("trees: malformed trees, headers, outputs and batches are InvalidInput") {
  HandTree bad_child = stump(0.0, TreeCompare::kLess, false);
  bad_child.cright[0] = 7;
  HandTree bad_feature = stump(0.0, TreeCompare::kLess, false);
  bad_feature.split_index[0] = 3;
  HandTree categorical = stump(0.0, TreeCompare::kLess, false);
  categorical.cmp[0] = 0;
  HandTree cycle = stump(0.0, TreeCompare::kLess, false);
  cycle.cleft[0] = 2;
  TreeEnsemble e(header(2, 1));
  CHECK_THROWS_CODE(e.add_tree(bad_child.arrays()), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(e.add_tree(bad_feature.arrays()), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(e.add_tree(categorical.arrays()), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(e.add_tree(cycle.arrays()), ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(e.finalize({TreeOutput::kRawMargin}, false), ErrorCode::kInvalidInput);  // no trees
  e.add_tree(stump(0.0, TreeCompare::kLess, false).arrays());
  CHECK_THROWS_CODE(e.finalize({TreeOutput::kLabel}, false), ErrorCode::kInvalidInput);
  e.finalize({TreeOutput::kRawMargin}, false);
  std::vector<float> x(6, 0.0f);
  CHECK_THROWS_CODE(e.run({borrow(x, 2, 3)}), ErrorCode::kInvalidInput);
  TreeEnsembleHeader no_base = header(2, 2);
  no_base.base_scores.clear();
  CHECK_THROWS_CODE(TreeEnsemble{no_base}, ErrorCode::kInvalidInput);
  CHECK_THROWS_CODE(tree_postprocessor_from_name("unknown"), ErrorCode::kInvalidInput);
}

TEST_CASE("trees: many threads run one ensemble at once and each gets its own answer") {
  TreeEnsemble e(header(1, 1));
  for (int t = 0; t < 8; ++t) e.add_tree(stump(t * 0.5, TreeCompare::kLess, t % 2 == 0).arrays());
  e.finalize({TreeOutput::kRawMargin}, false);
  std::vector<std::thread> threads;
  std::vector<int> wrong(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      std::vector<float> x(300);
      for (size_t r = 0; r < x.size(); ++r) x[r] = static_cast<float>((r + i) % 9) * 0.5f - 0.25f;
      for (int round = 0; round < 20; ++round) {
        const auto out = e.run({borrow(x, static_cast<int64_t>(x.size()), 1)});
        const float* m = static_cast<const float*>(out[0].data);
        for (size_t r = 0; r < x.size(); ++r) {
          double expected = 0.0;
          for (int t = 0; t < 8; ++t) expected += x[r] < t * 0.5f ? 10.0 : 20.0;
          wrong[i] += m[r] != static_cast<float>(expected);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int w : wrong) CHECK_EQ(w, 0);
}

namespace {

// A random tree in Treelite's arrays: `splits` internal nodes, grown at random leaves
// (so some branches run deep) or, as a chain, always at the newest leaf; random
// operators, float64 thresholds, defaults and ids.
HandTree random_tree(std::mt19937& rng, int32_t features, int splits, bool chain = false) {
  std::uniform_real_distribution<double> value(-2.0, 2.0);
  HandTree tree;
  std::vector<int32_t> open{tree.leaf(value(rng))};
  for (int s = 0; s < splits; ++s) {
    const size_t pick = chain ? open.size() - 1 : std::uniform_int_distribution<size_t>(0, open.size() - 1)(rng);
    const int32_t node = open[pick];
    open.erase(open.begin() + static_cast<std::ptrdiff_t>(pick));
    tree.split_index[node] = std::uniform_int_distribution<int32_t>(0, features - 1)(rng);
    tree.threshold[node] = value(rng) * 0.7;
    tree.cmp[node] = static_cast<int8_t>(std::uniform_int_distribution<int>(2, 5)(rng));
    tree.default_left[node] = static_cast<uint8_t>(rng() & 1);
    const int32_t a = tree.leaf(value(rng)), b = tree.leaf(value(rng));
    tree.children(node, a, b);
    open.push_back(a);
    open.push_back(b);
  }
  return tree;
}

// The plain reading of Treelite's arrays: float64 comparisons, NaN to the default child.
double reference_leaf(const HandTree& tree, const float* row) {
  int32_t node = 0;
  while (tree.cleft[node] != -1) {
    const double x = row[tree.split_index[node]], t = tree.threshold[node];
    bool left;
    if (std::isnan(x)) {
      left = tree.default_left[node] != 0;
    } else {
      switch (static_cast<TreeCompare>(tree.cmp[node])) {
        case TreeCompare::kLess: left = x < t; break;
        case TreeCompare::kLessEqual: left = x <= t; break;
        case TreeCompare::kGreater: left = x > t; break;
        default: left = x >= t; break;
      }
    }
    node = left ? tree.cleft[node] : tree.cright[node];
  }
  return tree.leaf_value[node];
}

}  // namespace

TEST_CASE("trees: every walk (lanes over rows, refilled lanes, lanes over trees) matches the plain reading") {
  std::mt19937 rng(5);
  constexpr int32_t kFeatures = 5;
  std::vector<HandTree> forest;
  // 17 trees in all: single rows walk them in groups (12 at a time), the last group part-filled.
  for (int t = 0; t < 13; ++t) forest.push_back(random_tree(rng, kFeatures, t % 3 == 0 ? 7 : 25));
  // Chains: the deepest leaf far below the average one (walked with refilled lanes).
  for (int t = 0; t < 3; ++t) forest.push_back(random_tree(rng, kFeatures, 30, true));
  // A full tree of depth 3 (balanced: walked in lockstep).
  HandTree full;
  std::vector<int32_t> level{full.split(0, 0.0, TreeCompare::kLess, true)};
  for (int depth = 0; depth < 3; ++depth) {
    std::vector<int32_t> below;
    for (int32_t node : level) {
      const bool last = depth == 2;
      const int32_t a = last ? full.leaf(depth + node) : full.split(depth + 1, 0.3 * node, TreeCompare::kLessEqual, false);
      const int32_t b = last ? full.leaf(-node) : full.split(depth + 2, -0.2 * node, TreeCompare::kGreater, true);
      full.children(node, a, b);
      below.push_back(a);
      below.push_back(b);
    }
    level = below;
  }
  forest.push_back(full);
  TreeEnsemble e(header(kFeatures, 1));
  for (const HandTree& tree : forest) e.add_tree(tree.arrays());
  e.finalize({TreeOutput::kRawMargin}, false);

  constexpr int64_t kRows = 301;  // blocks of 128, groups of 8, and a tail of 5
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(kRows * kFeatures);
  for (float& v : x) v = (rng() % 8 == 0) ? kNaN : normal(rng);
  std::vector<double> together(kRows), alone(kRows);
  e.margins(x.data(), kRows, together.data(), nullptr);
  for (int64_t r = 0; r < kRows; ++r) e.margins(x.data() + r * kFeatures, 1, &alone[r], nullptr);
  int wrong = 0;
  for (int64_t r = 0; r < kRows; ++r) {
    double expected = 0.0;
    for (const HandTree& tree : forest) expected += reference_leaf(tree, x.data() + r * kFeatures);
    wrong += std::fabs(together[r] - expected) > 1e-9 || std::fabs(alone[r] - expected) > 1e-9;
  }
  CHECK_EQ(wrong, 0);
}

TEST_CASE("trees: every operator agrees with float64 comparisons at infinities and float limits") {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr float kMax = std::numeric_limits<float>::max();
  constexpr float kTiny = std::numeric_limits<float>::denorm_min();
  const double thresholds[] = {-kInf, -1e300, -double{kMax}, -0.0, 0.0, double{kTiny}, 0.1, 1.0, double{kMax}, 1e300, kInf};
  // Zeros of both signs, the smallest subnormals and a NaN with its sign bit set as well.
  const std::vector<float> x = {-std::numeric_limits<float>::infinity(), -kMax, -kTiny, -0.0f, 0.0f, kTiny,
                                std::nextafter(0.1f, 0.0f), 0.1f, 1.0f, std::nextafter(1.0f, 2.0f), kMax,
                                std::numeric_limits<float>::infinity(), kNaN, -kNaN};
  int wrong = 0;
  for (double t : thresholds) {
    for (TreeCompare op : {TreeCompare::kLess, TreeCompare::kLessEqual, TreeCompare::kGreater,
                           TreeCompare::kGreaterEqual}) {
      for (bool nan_left : {false, true}) {
        const HandTree tree = stump(t, op, nan_left);
        const auto got = stump_margins(tree, x);  // 8 rows at once, then one by one
        for (size_t i = 0; i < x.size(); ++i) {
          const double expected = reference_leaf(tree, &x[i]);
          wrong += got[i] != expected;
          wrong += stump_margins(tree, {x[i]})[0] != expected;  // a batch of one row
        }
      }
    }
  }
  CHECK_EQ(wrong, 0);
}

TEST_CASE("trees: a single row wider than the walk's stack buffer splits on its last features") {
  constexpr int32_t kFeatures = 700;  // twice that many keys: more than the stack holds
  TreeEnsemble e(header(kFeatures, 1));
  for (bool nan_left : {true, false}) {
    HandTree tree;
    const int32_t root = tree.split(kFeatures - 1, 0.5, TreeCompare::kLess, nan_left);
    const int32_t yes = tree.leaf(nan_left ? 1.0 : 10.0), no = tree.leaf(nan_left ? 2.0 : 20.0);
    tree.children(root, yes, no);
    e.add_tree(tree.arrays());
  }
  e.finalize({TreeOutput::kRawMargin}, false);
  std::vector<float> x(kFeatures, 0.0f);
  double margin = 0.0;
  x.back() = 0.25f;
  e.margins(x.data(), 1, &margin, nullptr);
  CHECK_EQ(margin, 11.0);
  x.back() = 0.75f;
  e.margins(x.data(), 1, &margin, nullptr);
  CHECK_EQ(margin, 22.0);
  x.back() = kNaN;  // the first tree sends NaN left, the second right
  e.margins(x.data(), 1, &margin, nullptr);
  CHECK_EQ(margin, 21.0);
}
