"""The statements of the dispatch cycle (:mod:`.cycle`): its reads of capacity and candidates
and the dispatch UPDATE."""

from __future__ import annotations

from sqlalchemy import text

CONTROLS_SQL = text(
    "SELECT 'p' AS k, provider AS name, throttled_until FROM provider_controls"
    " WHERE provider = :p AND throttled_until > :now"
    " UNION ALL SELECT 'm', model, NULL FROM model_controls WHERE paused"
    " UNION ALL SELECT 't', tenant_id, NULL FROM tenants WHERE paused"
)

USAGE_SQL = text(
    "SELECT tenant_id, model, kind, sum(cost)::int AS used FROM active_slots"
    " GROUP BY GROUPING SETS ((tenant_id), (model), (kind), ())"
)

TENANTS_SQL = text(
    "SELECT tenant_id, COALESCE(tier, claimed_tier, 1) AS tier, max_concurrency, weight"
    " FROM tenants WHERE waiting > 0 AND NOT paused"
)

TENANT_INFO_SQL = text(
    "SELECT tenant_id, COALESCE(tier, claimed_tier, 1) AS tier, max_concurrency, weight"
    " FROM tenants WHERE tenant_id = ANY(:ts)"
)
"""What :data:`TENANTS_SQL` reads, of the given tenants (a submit dispatching its own tasks)."""

TOP_QUEUED = """
        SELECT t.id, t.tenant_id, t.kind, t.model, t.rank, t.slot_cost, t.enqueued_at
        FROM tasks t
        WHERE t.tenant_id = e.tenant_id AND t.status = 1
          AND (t.not_before IS NULL OR t.not_before <= :now)
          AND t.model <> ALL(CAST(:blocked_models AS text[]))
          AND t.kind <> ALL(CAST(:blocked_kinds AS smallint[]))
        ORDER BY t.rank DESC, t.enqueued_at
        LIMIT e.k
"""
"""The top ``e.k`` dispatchable queued tasks of the tenant ``e.tenant_id`` by rank (the body of a
``LATERAL`` join)."""

CANDIDATES_SQL = text(
    "SELECT c.id, c.tenant_id, c.kind, c.model, c.rank, c.slot_cost, c.enqueued_at"
    " FROM unnest(CAST(:tenants AS text[]), CAST(:ks AS int[])) AS e(tenant_id, k)"
    " CROSS JOIN LATERAL (" + TOP_QUEUED + ") c"
)

BACKOFF_SQL = text("SELECT min(not_before) FROM tasks WHERE status = 1 AND not_before > :now")

DISPATCH_SQL = text(
    """
    UPDATE tasks SET
        status = 2, attempt = attempt + 1, submit_state = 1, submit_started_at = NULL,
        prediction_id = NULL, progress = 0, started_at = NULL, not_before = NULL,
        dispatched_at = :now, dispatch_emitted_at = :now, updated_at = :now,
        run_deadline = :now + make_interval(secs => run_timeout_s),
        last_provider_update_at = NULL, last_sequence = last_sequence + 1
    WHERE id = ANY(:ids) AND status = 1
    RETURNING *
    """
)
