// Instantiates the selective scan bwd kernel for fp16 activations (one dtype per file: nvcc runs them in parallel).
#include "scan/cuda/selective_scan_bwd_kernel.cuh"

namespace llmkernels::scan {
template void launch_selective_scan_bwd<__half>(const ScanBwdParams& p, cudaStream_t stream);
}  // namespace llmkernels::scan
