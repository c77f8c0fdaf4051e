"""Identity: who is asking, as the `Principal` every story is owned by.

Today the service has no authentication: every caller is the one anonymous
principal (`ANONYMOUS_PRINCIPAL`, default `anonymous`), so stories and limits are
keyed by it and the rate limiter falls back to the client's address. Bearer
tokens and API keys land in this package, behind the same `Authenticator` shape.
"""

from app.core.security.principal import AnonymousAuthenticator, Authenticator, Principal

__all__ = ["AnonymousAuthenticator", "Authenticator", "Principal"]
