"""Task groups and delayed tasks (issue 18). See docs/group-state-machine.md."""
