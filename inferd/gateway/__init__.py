"""The gateway: model groups, routing, retries, fallback, circuit breakers and degradation."""
