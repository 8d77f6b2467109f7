// softmax_topk for k > 32, where a per-thread list in registers no longer fits: every row
// is sorted on the device and its first k entries are kept.
//
// Each element becomes its 64-bit element_key (value rank, then ~index), unique within a
// row, so a descending sort of the keys alone is the order kernels.h asks for (no
// stability needed, no payload to carry). CUB's segmented radix sort does the sorting,
// one segment per row, in chunks of rows whose keys fit kChunkItems; the scratch memory
// comes from the device's pool, per stream (ScratchLease).
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>

#include "common.cuh"

namespace conveyor::kernels::cuda::detail {

namespace {

// Keys sorted per chunk: 4M keys are 64 MiB of key buffers (in and out). The scratch
// stays cached for the stream, so it is kept modest; large batches take a few chunks.
constexpr int64_t kChunkItems = int64_t{1} << 22;

// One block per row: the row's max and sum (as softmax computes them) and its keys.
__global__ void make_keys_kernel(const float* __restrict__ x, uint32_t cols, int64_t first_row,
                                 uint64_t* __restrict__ keys, MaxSum* __restrict__ stats) {
  __shared__ MaxSum partials[32];
  const int64_t chunk_row = blockIdx.x;
  const float* row = x + (first_row + chunk_row) * cols;
  MaxSum acc{-INFINITY, 0.0f};
  uint64_t* row_keys = keys + chunk_row * cols;
  for_each_in_row(row, cols, [&](float v, uint32_t i) {
    max_sum_add(acc, v);
    row_keys[i] = element_key(v, i);
  });
  acc = block_allreduce(acc, MergeMaxSum{}, partials);
  if (threadIdx.x == 0) stats[chunk_row] = acc;
}

__global__ void row_offsets_kernel(int* offsets, int segments, int cols) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i <= segments; i += gridDim.x * blockDim.x) offsets[i] = i * cols;
}

// The first k sorted keys of each row become (probability, index).
__global__ void emit_topk_kernel(const uint64_t* __restrict__ sorted, uint32_t cols, int k,
                                 const MaxSum* __restrict__ stats, int64_t first_row, float* __restrict__ values,
                                 int64_t* __restrict__ indices) {
  const int64_t chunk_row = blockIdx.x;
  const MaxSum s = stats[chunk_row];
  const int64_t out_row = (first_row + chunk_row) * k;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const uint64_t key = sorted[chunk_row * cols + j];
    values[out_row + j] = expf(key_float(key) - s.max) / s.sum;
    indices[out_row + j] = key_index(key);
  }
}

size_t align_up(size_t n) { return (n + 255) & ~size_t{255}; }

}  // namespace

void softmax_topk_sorted(const float* x, int64_t rows, int64_t cols, int64_t k, float* values, int64_t* indices,
                         const Launch& launch) {
  const cudaStream_t stream = stream_of(launch);
  const int64_t chunk_rows = std::min(rows, std::max<int64_t>(1, kChunkItems / cols));
  const int64_t chunk_items = chunk_rows * cols;
  if (chunk_items > INT32_MAX) invalid("softmax_topk: a row of more than 2^31 - 1 elements cannot be sorted");

  // The size query must instantiate the same template as the sort below (same argument types).
  size_t sort_bytes = 0;
  check_cuda(cub::DeviceSegmentedRadixSort::SortKeysDescending(
                 nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
                 static_cast<int>(chunk_items), static_cast<int>(chunk_rows), static_cast<const int*>(nullptr),
                 static_cast<const int*>(nullptr) + 1, 0, 64, stream),
             "cub::DeviceSegmentedRadixSort (size query)");
  const size_t keys_bytes = align_up(sizeof(uint64_t) * static_cast<size_t>(chunk_items));
  const size_t offsets_bytes = align_up(sizeof(int) * static_cast<size_t>(chunk_rows + 1));
  const size_t stats_bytes = align_up(sizeof(MaxSum) * static_cast<size_t>(chunk_rows));
  ScratchLease scratch(launch, 2 * keys_bytes + offsets_bytes + stats_bytes + sort_bytes);
  auto* base = static_cast<char*>(scratch.data());
  auto* keys_in = reinterpret_cast<uint64_t*>(base);
  auto* keys_out = reinterpret_cast<uint64_t*>(base + keys_bytes);
  auto* offsets = reinterpret_cast<int*>(base + 2 * keys_bytes);
  auto* stats = reinterpret_cast<MaxSum*>(base + 2 * keys_bytes + offsets_bytes);
  void* sort_temp = base + 2 * keys_bytes + offsets_bytes + stats_bytes;

  const int threads = row_block_threads(cols);
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - first);
    const auto blocks = static_cast<unsigned>(n);  // n * cols <= 2^31 - 1, so n fits a grid
    make_keys_kernel<<<blocks, threads, 0, stream>>>(x, static_cast<uint32_t>(cols), first, keys_in, stats);
    check_launch("softmax_topk (keys)");
    row_offsets_kernel<<<static_cast<unsigned>((n + 256) / 256), 256, 0, stream>>>(offsets, static_cast<int>(n),
                                                                                static_cast<int>(cols));
    check_launch("softmax_topk (offsets)");
    size_t temp_bytes = sort_bytes;
    check_cuda(cub::DeviceSegmentedRadixSort::SortKeysDescending(
                   sort_temp, temp_bytes, static_cast<const uint64_t*>(keys_in), keys_out, static_cast<int>(n * cols),
                   static_cast<int>(n), static_cast<const int*>(offsets), static_cast<const int*>(offsets) + 1, 0, 64,
                   stream),
               "cub::DeviceSegmentedRadixSort");
    emit_topk_kernel<<<blocks, 128, 0, stream>>>(keys_out, static_cast<uint32_t>(cols), static_cast<int>(k), stats,
                                                 first, values, indices);
    check_launch("softmax_topk (emit)");
  }
}

}  // namespace conveyor::kernels::cuda::detail
