"""Rate limiting: how often each client may call the API.

- `clients`: who the client is (the principal, else its address, trusting
  forwarding headers only from configured proxies);
- `counters`: fixed-window counts in Redis (shared) or in this process;
- `policy`: which limits apply to a request, and the check (429 when over);
- `middleware`: names the client once per request and adds the headers.
"""

from app.core.ratelimit.clients import (
    IPV6_CLIENT_PREFIX,
    TrustedProxies,
    client_ip,
    client_key,
    key_hash,
)
from app.core.ratelimit.counters import (
    Counters,
    FailoverCounters,
    InProcessCounters,
    RedisCounters,
    WindowResult,
    preload_rate_limit_script,
)
from app.core.ratelimit.middleware import RateLimitMiddleware
from app.core.ratelimit.policy import (
    CLIENT_KEY,
    RateLimitedError,
    RateLimiter,
    RateLimitPolicy,
    is_operational_path,
    limiter,
)

__all__ = [
    "CLIENT_KEY",
    "IPV6_CLIENT_PREFIX",
    "Counters",
    "FailoverCounters",
    "InProcessCounters",
    "RateLimitMiddleware",
    "RateLimitPolicy",
    "RateLimitedError",
    "RateLimiter",
    "RedisCounters",
    "TrustedProxies",
    "WindowResult",
    "client_ip",
    "client_key",
    "is_operational_path",
    "key_hash",
    "limiter",
    "preload_rate_limit_script",
]
