"""Model runner: persistent input buffers, paged-attention forward, sampling (torch)."""
