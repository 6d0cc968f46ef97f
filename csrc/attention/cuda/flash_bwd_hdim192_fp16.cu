// One instantiation of the flash attention bwd kernel (fp16, head dim 192); one per file so nvcc runs them in parallel.
#include "attention/cuda/flash_bwd_kernel.cuh"

namespace llmk::flash {
template void run_flash_bwd<__half, 192>(const BwdParams&, cudaStream_t);
}  // namespace llmk::flash
