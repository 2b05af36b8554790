"""Upstream accounts: several UniAll keys, each task bound to the account that created it (SPEC section 9)."""
