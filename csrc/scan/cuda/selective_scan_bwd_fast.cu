// Instantiates the channel-parallel selective scan backward (selective_scan_bwd_fast.cuh) for the three
// activation dtypes; its finish kernels are not templates, so they live in this one translation unit.
#include "scan/cuda/selective_scan_bwd_fast.cuh"

namespace llmkernels::scan {
template void launch_selective_scan_bwd_fast<float>(const ScanBwdFastParams& p, cudaStream_t stream);
template void launch_selective_scan_bwd_fast<__half>(const ScanBwdFastParams& p, cudaStream_t stream);
template void launch_selective_scan_bwd_fast<__nv_bfloat16>(const ScanBwdFastParams& p, cudaStream_t stream);
}  // namespace llmkernels::scan
