// Instantiates the selective scan bwd kernel for bf16 activations (one dtype per file: nvcc runs them in parallel).
#include "scan/cuda/selective_scan_bwd_kernel.cuh"

namespace llmkernels::scan {
template void launch_selective_scan_bwd<__nv_bfloat16>(const ScanBwdParams& p, cudaStream_t stream);
}  // namespace llmkernels::scan
