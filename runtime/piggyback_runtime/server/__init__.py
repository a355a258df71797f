"""HTTP server: OpenAI-compatible API, health, readiness and metrics."""
