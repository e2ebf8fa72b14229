"""Results: provider results applied to tasks (a Kafka batch per transaction, fenced by attempt), the
provider-submit protocol the adapter calls around each create, and the results consumer.
"""
