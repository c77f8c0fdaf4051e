"""Pure-ASGI middleware around the routers: request context and access log, body
size, maintenance mode and request metrics. Pure ASGI rather than
`BaseHTTPMiddleware`, which runs the endpoint in another task (ContextVars set
here would not reach it) and buffers streaming bodies."""
