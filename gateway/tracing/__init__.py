"""OpenTelemetry tracing (SPEC section 11), on only when an OTLP endpoint is configured.

``gateway.tracing.setup`` decides from the standard ``OTEL_*`` variables and imports nothing of OpenTelemetry
when tracing is off. When it is on, ``gateway.tracing.spans`` holds the small interface the rest uses (a server
span per request that continues the client's ``traceparent``, child spans, header injection) and
``gateway.tracing.instrument`` the traced variants the app factory picks instead of the plain ones at build time,
so the hot paths run exactly the same code as before when tracing is off.
"""
