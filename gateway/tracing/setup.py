"""Whether tracing is on, and building it from the standard OpenTelemetry environment variables.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (and ``OTEL_SDK_DISABLED``
is not ``true``). Everything else is the SDK's own reading of the standard variables: the exporter's endpoint,
headers, timeout and compression (``OTEL_EXPORTER_OTLP_*``), the sampler (``OTEL_TRACES_SAMPLER``/``_ARG``), the
batch processor (``OTEL_BSP_*``) and the resource (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``; the service
name defaults to ``kling-gateway``). Traces go over OTLP/HTTP (protobuf) with W3C Trace Context propagation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from gateway.config import ConfigError

if TYPE_CHECKING:
    from gateway.tracing.spans import Tracing

SERVICE_NAME: Final = "kling-gateway"
ENDPOINT_VARIABLES: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """True when an OTLP endpoint is configured and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def tracing_from_env(environ: Mapping[str, str]) -> Tracing | None:
    """Tracing configured by ``environ`` (the process environment), or None when it is off.

    The exporter and sampler read the process environment themselves, as the OpenTelemetry SDK does everywhere.
    """
    if not tracing_enabled(environ):
        return None
    try:
        from gateway.tracing.spans import Tracing, otlp_provider  # on demand: the [otel] extra
    except ImportError as exc:
        variable = next(name for name in ENDPOINT_VARIABLES if environ.get(name, "").strip())
        raise ConfigError(
            f"{variable} is set but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'kling-gateway[otel]', or unset it"
        ) from None
    return Tracing(otlp_provider(SERVICE_NAME))
