"""Model runner: persistent input buffers, paged-attention forward, sampling (torch)."""

import os
import sys

# torch's OpenMP runtime on Linux (libgomp) spins ~300k iterations at each barrier by default.
# When the engine shares its cores (API servers, other engines), a spinning thread waits for
# a descheduled peer and a parallel op gets 10-100x slower (measured on 2 busy cores: GGUF
# dequantisation 15 s -> 0.5 s, one decode attention 8 ms -> 0.1 ms with PASSIVE). libgomp
# reads this once, when torch is first imported: set it only before that, never over a
# user's choice.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
