"""`shoal serve`: launcher, engine-core processes, DP coordinator, API servers."""
