"""Helpers the test suites share: the scripted fake upstream, the gateway harness, the seed examples."""
