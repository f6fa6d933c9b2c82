"""The outbox dispatcher (generic) and the inventory saga (its handlers)."""
