"""The audit trail: who changed which key (or account), what changed and when, kept in the store, never a secret.

``gateway.auth.key_admin`` records every key action through :func:`gateway.audit.trail.record`, so the admin API,
the CLI and any later front end record the same way; ``GET /gateway/audit`` and ``kling-gateway audit`` read it.
"""
