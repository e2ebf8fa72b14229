"""Control: operator and tenant actions on tasks and tenants (cancel, bulk cancel, redrive, tenants, paused models)."""
