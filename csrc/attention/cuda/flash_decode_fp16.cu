// The GQA-sharing decode kernel for __half, every head-dim bucket (flash_decode_kernel.cuh).
#include "attention/cuda/flash_decode_kernel.cuh"

namespace llmk::flash {
template void run_flash_decode_gqa<__half, 32>(const FwdParams&, cudaStream_t);
template void run_flash_decode_gqa<__half, 64>(const FwdParams&, cudaStream_t);
template void run_flash_decode_gqa<__half, 128>(const FwdParams&, cudaStream_t);
template void run_flash_decode_gqa<__half, 256>(const FwdParams&, cudaStream_t);
}  // namespace llmk::flash
