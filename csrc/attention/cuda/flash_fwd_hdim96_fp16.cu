// One instantiation of the flash attention fwd kernel (fp16, head dim 96); one per file so nvcc runs them in parallel.
#include "attention/cuda/flash_fwd_kernel.cuh"

namespace llmk::flash {
template void run_flash_fwd<__half, 96>(const FwdParams&, cudaStream_t);
}  // namespace llmk::flash
