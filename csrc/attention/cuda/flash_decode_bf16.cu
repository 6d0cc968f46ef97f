// The GQA-sharing decode kernel for __nv_bfloat16, every head-dim bucket (flash_decode_kernel.cuh).
#include "attention/cuda/flash_decode_kernel.cuh"

namespace llmk::flash {
template void run_flash_decode_gqa<__nv_bfloat16, 32>(const FwdParams&, cudaStream_t);
template void run_flash_decode_gqa<__nv_bfloat16, 64>(const FwdParams&, cudaStream_t);
template void run_flash_decode_gqa<__nv_bfloat16, 128>(const FwdParams&, cudaStream_t);
template void run_flash_decode_gqa<__nv_bfloat16, 256>(const FwdParams&, cudaStream_t);
}  // namespace llmk::flash
