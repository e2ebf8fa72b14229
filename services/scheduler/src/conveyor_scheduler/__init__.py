"""conveyor_scheduler."""
