"""Dispatch and leadership: the leader election and lease, the dispatch cycle, the leader's loops,
the priority policy, the provider token bucket and the wake-ups between replicas.
"""
