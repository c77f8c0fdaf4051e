"""Domain-free plumbing every other part of the service stands on: configuration,
logs, metrics, Sentry, system sampling, Redis within a time budget, background
tasks and shutdown. Nothing here imports from `app.core`, a provider, a service
or a router; they import from here."""
