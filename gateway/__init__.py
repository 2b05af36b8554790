"""kling-gateway: a validating reverse proxy in front of UniAll's Kling v3 video API."""

__version__ = "0.1.0"
