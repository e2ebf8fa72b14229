"""conveyor_provider_adapter."""
