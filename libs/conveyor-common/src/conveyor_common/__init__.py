"""conveyor_common."""
