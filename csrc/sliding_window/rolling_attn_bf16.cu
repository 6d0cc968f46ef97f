// Instantiates the rolling-window attention kernels for __nv_bfloat16, every head-dim bucket.
#include "sliding_window/rolling_attn_kernel.cuh"

namespace llmkernels::sliding_window {
template void launch_rolling_attn<__nv_bfloat16, 32>(const RollingAttnParams&, cudaStream_t);
template void launch_rolling_attn<__nv_bfloat16, 64>(const RollingAttnParams&, cudaStream_t);
template void launch_rolling_attn<__nv_bfloat16, 128>(const RollingAttnParams&, cudaStream_t);
template void launch_rolling_attn<__nv_bfloat16, 256>(const RollingAttnParams&, cudaStream_t);
}  // namespace llmkernels::sliding_window
