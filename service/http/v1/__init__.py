"""The OpenAI-compatible API (``/v1``): routes, request schemas, response shapes."""
