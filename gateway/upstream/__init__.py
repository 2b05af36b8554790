"""Talking to UniAll: the client, its transports (lean HTTP/1.1 and aiohttp) and the circuit breaker."""
