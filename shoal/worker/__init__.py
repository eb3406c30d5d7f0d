"""Model runner: persistent input buffers, paged-attention forward, sampling (torch)."""

from shoal.openmp_policy import set_wait_policy

# Before torch is imported: sleep at once between parallel ops unless an engine already chose
# to spin briefly (`EngineCore` calls `configure_engine` first) or the user set the policy.
# Why: shoal/openmp_policy.py.
set_wait_policy(None)
