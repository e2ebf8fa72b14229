"""The store: the schema, the engine and migrations, reads of tasks and events, the transactional
outbox (state change, events and Kafka records in one transaction) and its relay to Kafka.
"""
