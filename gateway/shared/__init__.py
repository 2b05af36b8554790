"""State that replicas share through Redis: the Redis building blocks and the fail-open policy around them."""
