"""The leader's sweeps: deadlines (expiry), rescue of lost dispatches, gauges, retention and counter reconcile."""
