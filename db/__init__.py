"""Persistence: tables, engines, units of work, repositories, the outbox store and migrations."""
