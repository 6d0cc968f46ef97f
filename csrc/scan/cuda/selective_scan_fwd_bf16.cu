// Instantiates the selective scan fwd kernel for bf16 activations (one dtype per file: nvcc runs them in parallel).
#include "scan/cuda/selective_scan_fwd_kernel.cuh"

namespace llmkernels::scan {
template void launch_selective_scan_fwd<__nv_bfloat16>(const ScanFwdParams& p, cudaStream_t stream);
}  // namespace llmkernels::scan
