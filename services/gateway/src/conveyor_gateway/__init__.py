"""conveyor_gateway."""
