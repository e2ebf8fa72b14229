"""conveyor_devstack."""
