"""The scheduler's gRPC surface: SchedulerService (gateway-facing) and ProviderCoordinationService (adapter-facing)."""
