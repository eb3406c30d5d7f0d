"""Engine core: requests, scheduler and KV-cache bookkeeping (pure Python, no torch here)."""
