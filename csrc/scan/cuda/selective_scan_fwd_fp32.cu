// Instantiates the selective scan fwd kernel for fp32 activations (one dtype per file: nvcc runs them in parallel).
#include "scan/cuda/selective_scan_fwd_kernel.cuh"

namespace llmkernels::scan {
template void launch_selective_scan_fwd<float>(const ScanFwdParams& p, cudaStream_t stream);
}  // namespace llmkernels::scan
