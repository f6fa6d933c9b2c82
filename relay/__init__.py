"""The event relay: changes of orders (db.relay's queue) published to NATS JetStream."""
