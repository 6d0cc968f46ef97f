class MultiheadFlashAttention: pass
