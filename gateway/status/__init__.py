"""Task-status polls: the cache, the coalescer and the poller that answers ``GET /v1/videos/{id}``."""
