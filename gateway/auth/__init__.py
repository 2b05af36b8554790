"""Who is calling: the principal, the key table of a running process, key administration and request limits."""
