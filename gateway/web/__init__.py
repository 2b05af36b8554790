"""The HTTP surface: routes, the fast lane, middleware, bodies, error responses and the OpenAPI document."""
