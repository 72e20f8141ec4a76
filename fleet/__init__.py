"""A fleet of replicas sharing keys, limits, usage and audit through Redis (REDIS_URL)."""
