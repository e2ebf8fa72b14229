"""Test harnesses for Conveyor's tests and benchmarks (never installed in a service image).

* :mod:`.scheduler`: settings, specs, results and invariant checks for in-process scheduler replicas;
* :mod:`.adapter`: a scripted ProviderCoordinationService and Kafka helpers for the adapter's tests;
* :mod:`.gateway`: in-memory SchedulerService and notifier doubles for the gateway's unit tests;
* :mod:`.tokens`: test keys and token minting; :mod:`.stack`: a real scheduler on real PostgreSQL
  behind a real gateway, for integration tests.
"""
