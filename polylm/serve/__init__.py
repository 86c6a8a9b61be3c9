"""`polylm serve`: an OpenAI-compatible HTTP API over the continuous-batching scheduler: the worker
(`engine`), the API's request and response shapes (`schema`) and the ASGI app (`app`)."""
