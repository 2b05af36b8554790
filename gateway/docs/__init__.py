"""README sections generated from the code: the configuration reference and troubleshooting by error code."""
