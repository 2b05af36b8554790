"""The ``kling-gateway`` command line, one module per command family."""
