"""Pure-ASGI middleware around the routers: request context and access log, body
size, header limits (`headers.py`), maintenance mode and request metrics. Pure
ASGI rather than `BaseHTTPMiddleware`, which runs the endpoint in another task
(ContextVars set here would not reach it) and buffers streaming bodies.

`server.py` is one level further out: the HTTP/1.1 protocol `python -m app` gives
uvicorn (request-head bound, read deadline), before any ASGI code runs."""
