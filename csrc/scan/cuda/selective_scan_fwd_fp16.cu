// Instantiates the selective scan fwd kernel for fp16 activations (one dtype per file: nvcc runs them in parallel).
#include "scan/cuda/selective_scan_fwd_kernel.cuh"

namespace llmkernels::scan {
template void launch_selective_scan_fwd<__half>(const ScanFwdParams& p, cudaStream_t stream);
}  // namespace llmkernels::scan
