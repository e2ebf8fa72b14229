"""Scheduler settings (environment prefix ``SCHEDULER_``), validated at start.

``SCHEDULER_DATABASE_URL`` is required and has no default: the scheduler is the only service with a
database URL, and a missing one must stop it at start. Every limit, the aging rate, the retry backoff
and the leader/poll intervals are configurable; the defaults follow the seed design (global
concurrency 5, per-user 3, queue capacity 1000, 3 attempts, provider 10 creates/s).
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from conveyor_common import limits
from conveyor_common.kafka.security import KafkaSecuritySettings
from conveyor_common.settings import ServiceSettings
from conveyor_common.tls import InternalTlsSettings
from conveyor_common.vocabulary import KIND_BY_NAME

"""Kind names used in the limit and cost maps (TaskKind without the prefix, lower case)."""


class SchedulerSettings(KafkaSecuritySettings, ServiceSettings, InternalTlsSettings):
    """Every knob of the scheduler."""

    model_config = SettingsConfigDict(env_prefix="SCHEDULER_", frozen=True, extra="ignore")

    database_url: SecretStr
    """PostgreSQL URL (``postgresql://`` or ``postgresql+psycopg://``). Required, no default."""
    db_pool_size: int = Field(default=10, ge=1, le=200)
    """Connections kept in the engine pool (the leader holds one more, dedicated)."""
    db_ping_idle_seconds: float = Field(default=1.0, ge=0)
    """A pooled connection idle this long is pinged before use (0: before every use). One used
    more recently is not: a connection the server dropped since then fails one statement."""
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    """Kafka bootstrap servers (outbox relay and results consumer)."""
    kafka_client_id: str = "conveyor-scheduler"
    """Kafka client id."""
    results_consumer_group: str = "scheduler-results"
    """Consumer group of the provider results consumer (every replica joins it)."""
    instance_id: str = ""
    """Replica id for logs and leader status (empty = host name + pid)."""
    provider_name: str = "replicate"
    """Provider every task is dispatched to (rate-limit and throttle bucket)."""

    # --- Admission -------------------------------------------------------------------------
    queue_capacity: int = Field(default=1000, ge=1)
    """Global cap on waiting (queued) tasks; the seed's 1000."""
    tenant_max_waiting: int = Field(default=1000, ge=1)
    """Default per-tenant cap on waiting tasks (a tenant's explicit limit wins)."""
    tenant_submit_rate: float = Field(default=50.0, gt=0)
    """Default per-tenant submit rate (tasks/s, token bucket refill)."""
    tenant_submit_burst: int = Field(default=100, ge=1)
    """Default per-tenant submit burst (token bucket size)."""
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60)
    """How long a (tenant, request_id) key is remembered."""
    max_batch_items: int = Field(default=100, ge=1, le=1000)
    """Largest BatchSubmitTasks accepted."""
    submit_group_commit: bool = True
    """Concurrent single SubmitTask calls share one transaction (group commit); each caller still
    gets its own outcome (``SubmitBatcher``)."""
    submit_group_max: int = Field(default=500, ge=1, le=10_000)
    """Most single submits written in one group transaction."""
    submit_group_concurrency: int = Field(default=1, ge=1, le=16)
    """Group transactions in flight at once (each on its own pooled connection; 2 overlaps one
    group's commit with the next group's statements, no clear gain measured on 2 cores)."""
    submit_group_linger_seconds: float = Field(default=0.0, ge=0, le=0.1)
    """How long a group waits for company before its flush (0: only the submits that arrived
    while the previous flush was running are grouped; no added latency when idle)."""
    webhook_presence_seconds: float = Field(default=2.0, gt=0, le=60)
    """How often the replica re-reads which tenants have webhook endpoints: the hint on each task
    event's record that wakes the notifier (deliveries themselves are exact; a stale hint delays one
    to the notifier's next poll)."""
    default_max_attempts: int = Field(default=3, ge=1, le=20)
    """Attempts per task when the request does not say (the seed's 3)."""
    max_attempts_cap: int = Field(default=10, ge=1, le=limits.MAX_ATTEMPTS_CEILING)
    """Largest max_attempts a request may ask for."""
    group_max_children: int = Field(default=1000, ge=1, le=10_000)
    """Most children in one task group (CreateGroup)."""
    default_run_timeout_seconds: int = Field(default=1800, ge=1)
    """Provider run deadline (Cancel-After) when the request does not set one."""

    # --- Limits at dispatch ------------------------------------------------------------------
    global_concurrency: int = Field(default=5, ge=1)
    """Slots held at once over every tenant (slot-cost weighted); the seed's 5."""
    tier_concurrency: dict[str, int] = Field(
        default_factory=lambda: {"free": 3, "premium": 5, "pro": 10}
    )
    """Default per-tenant slots by tier (the seed's per-user 3 for free)."""
    tier_weight: dict[str, int] = Field(default_factory=lambda: {"free": 1, "premium": 2, "pro": 4})
    """Default fair-share weight by tier."""
    tier_boost: dict[str, float] = Field(
        default_factory=lambda: {"free": 0.0, "premium": 1.0, "pro": 2.0}
    )
    """Priority boost by tier in class steps (the seed's +100/+200)."""
    kind_cost: dict[str, int] = Field(
        default_factory=lambda: {"video": 2, "image": 1, "text": 1, "audio": 1}
    )
    """Slots one task of a kind costs."""
    kind_limits: dict[str, int] = Field(default_factory=dict)
    """Slots all tasks of a kind may hold at once (absent = only the global limit)."""
    model_limits: dict[str, int] = Field(default_factory=dict)
    """Slots all tasks of a model may hold at once (absent = default_model_limit)."""
    default_model_limit: int = Field(default=0, ge=0)
    """Slots per model when model_limits does not name it (0 = no per-model limit)."""
    provider_rate_per_second: float = Field(default=10.0, gt=0)
    """Provider create rate (token bucket refill); the seed's 10/s."""
    provider_burst: int = Field(default=10, ge=1)
    """Provider token bucket size."""

    # --- Priority ----------------------------------------------------------------------------
    aging_rate_per_minute: float = Field(default=0.2, ge=0)
    """Effective priority gained per minute waited, in class steps (0.2 = one class per 5 min)."""
    priority_band_width: float = Field(default=1.0, gt=0)
    """Effective priorities within one band are "equal": fair share applies inside a band."""

    # --- Retries -----------------------------------------------------------------------------
    retry_base_seconds: float = Field(default=2.0, gt=0)
    """First retry backoff."""
    retry_max_seconds: float = Field(default=300.0, gt=0)
    """Backoff cap."""
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    """Relative jitter (0.2 = +-20%)."""

    # --- Leader and loops --------------------------------------------------------------------
    kafka_session_timeout_ms: int = Field(default=6_000, ge=1_000, le=300_000)
    """Session timeout of the results consumer: a replica lost without leaving the group (kill -9,
    frozen) has its partitions resumed by the others after this long. Brokers refuse values below
    their ``group.min.session.timeout.ms`` (6 s by default; the devstack's broker allows 1 s)."""
    leader_lock_key: int = 0x636F6E76  # "conv"
    """pg advisory lock key of the leader election."""
    leader_retry_seconds: float = Field(default=1.0, gt=0)
    """How often a follower tries to take the lead."""
    leader_lease_seconds: float = Field(default=3.0, ge=1, le=60)
    """The leader's lease: PostgreSQL ends a leader session idle this long (a frozen, stalled or
    cut-off leader), and with it the lead; a live leader heartbeats at a third of it."""
    idle_transaction_seconds: float = Field(default=1.0, ge=0.2, le=60)
    """PostgreSQL aborts a scheduler transaction left idle this long between statements (a frozen
    or stalled replica): its row locks stop blocking the other replicas' submits and it commits
    nothing late. Our transactions send their statements back to back."""
    lock_stall_seconds: float = Field(default=0.5, ge=0.05, le=60)
    """A scheduler transaction that another session waits on (a row lock), itself waiting on its
    client this long mid-transaction (a frozen or stalled replica), is ended: a frozen replica holds
    a live replica's submits and dispatches about this long at most."""
    stall_check_seconds: float = Field(default=0.25, gt=0, le=10)
    """How often every replica looks for scheduler sessions stalled on their client."""
    dispatch_poll_seconds: float = Field(default=1.0, gt=0)
    """Polling backstop of the dispatcher (NOTIFY and in-process wake-ups come first)."""
    dispatch_batch_max: int = Field(default=500, ge=1, le=10_000)
    """Most tasks dispatched in one transaction."""
    submit_dispatch: bool = True
    """On an idle leader (nothing else queued, room free), a submit taken by the leader's replica
    dispatches its own tasks in its transaction instead of waking a dispatch cycle for them."""
    dispatch_window: int = Field(default=256, ge=0, le=100_000)
    """Most tasks dispatched but not yet taken up by an adapter (BeginSubmit) at once; 0 = no bound.
    Keeps the Kafka command queue short, so priority and fair share hold at the provider rather
    than only at dispatch. Within it the window follows the adapters' measured take-up rate (see
    ``dispatch_window_seconds``)."""
    dispatch_window_seconds: float = Field(default=0.5, ge=0, le=60)
    """The window holds about this many seconds of the adapters' measured take-up (BeginSubmit)
    rate, between ``dispatch_window_min`` and ``dispatch_window``: an urgent task waits about this
    long behind dispatched work. 0 = a fixed window of ``dispatch_window``."""
    dispatch_window_min: int = Field(default=16, ge=1, le=100_000)
    """Smallest window (what an idle system starts a burst with)."""
    candidate_cache_seconds: float = Field(default=5.0, ge=0)
    """Longest the dispatcher reuses its per-tenant candidate cache between full reads while busy
    (new work, retries and the idle poll invalidate it sooner)."""
    tenant_candidates_max: int = Field(default=50, ge=1)
    """Most queued tasks read per tenant per cycle."""
    outbox_batch: int = Field(default=500, ge=1, le=10_000)
    """Outbox rows published per relay transaction."""
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    """Polling backstop of the outbox relay."""
    outbox_retention_seconds: float = Field(default=0.0, ge=0)
    """Published outbox rows are kept this long (marked, then deleted by the sweep: debugging); 0
    deletes them as they are published (cheaper: the events stay in task_events and Kafka)."""
    inbox_retention_seconds: float = Field(default=7 * 86_400.0, ge=60)
    """Processed result ids are kept this long (longer than any redelivery horizon)."""
    maintenance_seconds: float = Field(default=1.0, gt=0)
    """Period of the leader's sweeps (expiry, rescue, throttles, gauges)."""
    reconcile_seconds: float = Field(default=300.0, gt=0)
    """Period of the counter reconcile (waiting counters vs tasks)."""
    submit_lease_seconds: float = Field(default=30.0, gt=0)
    """A dispatch with no BeginSubmit after this long has its DispatchTask re-emitted."""
    stats_cache_seconds: float = Field(default=1.0, ge=0)
    """GetQueueStats answers are cached this long."""
    notify_coalesce_seconds: float = Field(default=0.005, ge=0)
    """NOTIFYs a replica's announcer sends after a commit are coalesced over this window (the
    busiest writers carry theirs in their own transaction)."""
    notify_work_coalesce_seconds: float = Field(default=0.05, ge=0, le=1)
    """A NOTIFY announcing only new work (submits to a non-leader replica) waits up to this long
    for more; freed capacity is announced within ``notify_coalesce_seconds``."""

    @field_validator("tier_concurrency", "tier_weight", "tier_boost")
    @classmethod
    def _tiers(cls, value: dict[str, object]) -> dict[str, object]:
        missing = {"free", "premium", "pro"} - set(value)
        if missing:
            raise ValueError(f"missing tiers {sorted(missing)}")
        return value

    @field_validator("kind_cost", "kind_limits")
    @classmethod
    def _kinds(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - set(KIND_BY_NAME)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {list(KIND_BY_NAME)}")
        if any(v < 1 for v in value.values()):
            raise ValueError("values must be >= 1")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 async driver."""
        return to_sqlalchemy_url(self.database_url.get_secret_value())


def to_sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` -> ``postgresql+psycopg://...`` (other drivers are replaced)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("database URL must look like postgresql://user@host:port/db")
    if scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError("database URL must be a postgresql:// URL")
    return f"postgresql+psycopg://{rest}"


def to_libpq_url(url: str) -> str:
    """A URL psycopg's ``connect`` accepts (driver suffix removed)."""
    rest = url.partition("://")[2]
    return f"postgresql://{rest}"
