"""The durable event path: outbox rows written with the state change, a relay, and idempotent tasks."""
