class SlidingWindowAttention: pass
