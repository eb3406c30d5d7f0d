"""Process runtime: the seed API (process managers, shutdown, ZMQ addresses)."""
