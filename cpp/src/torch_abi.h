// The few entry points of PyTorch's AOTInductor C ABI that Conveyor calls, declared
// here so that building Conveyor needs nothing from torch. They are looked up at run
// time with dlsym: the model container functions in a package's compiled model .so
// (torch/csrc/inductor/aoti_runtime/interface.h) and the tensor shims in
// libtorch_cpu.so (torch/csrc/inductor/aoti_torch/c/shim.h). Every function returns 0
// on success. Ownership as torch documents it: ContainerRun steals the input handles
// (the container deletes them) and gives the caller new output handles, which the
// caller deletes with aoti_torch_delete_tensor_object.
#pragma once

#include <cstddef>
#include <cstdint>

namespace conveyor::torch_abi {

struct AtenTensorOpaque;
using AtenTensorHandle = AtenTensorOpaque*;
struct ContainerOpaque;
using ContainerHandle = ContainerOpaque*;
using StreamHandle = void*;
using ProxyExecutorHandle = void*;
using Status = int32_t;

// ---- libtorch_cpu.so ----
using DTypeGetter = int32_t (*)();
using DeviceTypeGetter = int32_t (*)();
using CreateTensorFromBlob = Status (*)(void* data, int64_t ndim, const int64_t* sizes, const int64_t* strides,
                                        int64_t storage_offset, int32_t dtype, int32_t device_type,
                                        int32_t device_index, AtenTensorHandle* ret);
using EmptyStrided = Status (*)(int64_t ndim, const int64_t* sizes, const int64_t* strides, int32_t dtype,
                                int32_t device_type, int32_t device_index, AtenTensorHandle* ret);
using CopyInto = Status (*)(AtenTensorHandle self, AtenTensorHandle src, int32_t non_blocking);
using DeleteTensor = Status (*)(AtenTensorHandle tensor);
using GetDataPtr = Status (*)(AtenTensorHandle tensor, void** ret);
using GetDim = Status (*)(AtenTensorHandle tensor, int64_t* ret);
using GetInt64Array = Status (*)(AtenTensorHandle tensor, int64_t** ret);  // sizes, strides (borrowed)
using GetInt32 = Status (*)(AtenTensorHandle tensor, int32_t* ret);        // dtype, device type

// ---- the compiled model .so ----
using ContainerCreateWithDevice = Status (*)(ContainerHandle* ret, size_t num_models, const char* device,
                                             const char* cubin_dir);
using ContainerDelete = Status (*)(ContainerHandle container);
using ContainerRun = Status (*)(ContainerHandle container, AtenTensorHandle* inputs, size_t num_inputs,
                                AtenTensorHandle* outputs, size_t num_outputs, StreamHandle stream,
                                ProxyExecutorHandle proxy_executor);
using ContainerGetCount = Status (*)(ContainerHandle container, size_t* ret);
using ContainerGetName = Status (*)(ContainerHandle container, size_t index, const char** ret);
using ContainerGetCallSpec = Status (*)(ContainerHandle container, const char** in_spec, const char** out_spec);
using ContainerGetFlag = Status (*)(ContainerHandle container, size_t index, bool* ret);  // constant from_folded
struct ConstantMapEntry {
  const char* name;
  AtenTensorHandle handle;
};
// The constants the container holds (borrowed array); use_inactive: the standby buffer.
using ContainerExtractConstants = Status (*)(ContainerHandle container, const ConstantMapEntry** entries,
                                             size_t* count, bool use_inactive);
// The message of the calling thread's last failed call (absent from older packages).
using GetLastError = Status (*)(const char** message);

}  // namespace conveyor::torch_abi
