"""Configuration of the fake: timing, outputs, rate limits, webhook delivery and seeded fault knobs.

Every field can be given at start (``python -m fake_replicate --field-name VALUE`` or the env var
``FAKE_REPLICATE_FIELD_NAME``) and changed at runtime with ``POST /_fake/config`` (a JSON object of the
fields to change; ``{"force_429_next": N}`` is sugar for appending N ``429`` entries to ``create_script``).
``POST /_fake/reset`` restores the configuration the fake was started with.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conveyor_common.standard_webhooks import decode_secret

EventKind = Literal["start", "output", "logs", "completed"]
EVENT_KINDS: tuple[EventKind, ...] = ("start", "output", "logs", "completed")
OutputKind = Literal["png", "mp4", "text", "json"]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]
NonNeg = Annotated[float, Field(ge=0.0)]
CreateScriptItem = int | Literal["drop"]


class FakeConfig(BaseModel):
    """All knobs of the fake (see the module docstring and the package README for their meaning)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- identity and secrets (no defaults: they must be given) ---
    token: str = Field(min_length=1, description="API token expected in 'Authorization: Bearer'")
    webhook_secret: str = Field(description="whsec_ secret served at /v1/webhooks/default/secret")
    webhook_extra_secrets: list[str] = Field(
        default_factory=list, description="Extra secrets also signing each delivery (rotation)"
    )
    public_url: str | None = Field(
        default=None, description="Base URL used in urls/outputs (default: the bound URL)"
    )
    seed: int = Field(default=0, description="Seed of the RNG behind durations and fault rolls")

    # --- timing of a prediction ---
    min_duration_s: NonNeg = Field(default=0.2, description="Shortest total run (create->terminal)")
    max_duration_s: NonNeg = Field(default=1.0, description="Longest total run")
    starting_fraction: Rate = Field(default=0.2, description="Share of the run spent 'starting'")
    progress_steps: int = Field(default=5, ge=1, le=100, description="tqdm log updates per run")
    max_run_s: NonNeg = Field(default=1800.0, description="Runtime limit; longer runs fail")
    data_removed_after_s: NonNeg = Field(
        default=3600.0, description="After this long past completion input/output/logs/files go"
    )

    # --- outputs ---
    output_kind: OutputKind = Field(default="png", description="Default output: png|mp4|text|json")
    output_bytes: int = Field(default=16384, ge=0, description="Default size of each output file")
    list_page_size: int = Field(default=100, ge=1, le=1000, description="Page size of the list")
    cancel_after_min_s: NonNeg = Field(
        default=5.0,
        description="Shortest Cancel-After accepted (Replicate: 5 s; lower only to speed up tests)",
    )

    # --- rate limits (token buckets) ---
    create_rate_per_min: NonNeg = Field(default=600.0, description="Create refill rate")
    create_burst: int = Field(default=600, ge=1, description="Create bucket size")
    other_rate_per_min: NonNeg = Field(default=3000.0, description="Refill rate of other /v1 calls")
    other_burst: int = Field(default=3000, ge=1, description="Bucket size of other /v1 calls")
    low_credit: bool = Field(default=False, description="Creates limited to 6/min, burst 1")
    script_429_retry_after_s: int = Field(
        default=1, ge=0, description="retry_after of scripted (create_script) 429s"
    )

    # --- webhook delivery ---
    webhook_timeout_s: NonNeg = Field(default=5.0, description="Per-attempt HTTP timeout")
    webhook_retries: int = Field(default=3, ge=0, description="Retries after a failed attempt")
    webhook_retry_base_s: NonNeg = Field(default=0.5, description="Backoff base (doubles)")
    webhook_throttle_s: NonNeg = Field(default=0.5, description="Min gap of output/logs events")

    # --- seeded fault knobs (rates are probabilities 0..1) ---
    create_500_rate: Rate = Field(default=0.0, description="Create answers 500, nothing created")
    create_drop_rate: Rate = Field(
        default=0.0, description="Create takes effect, then the connection is closed (no answer)"
    )
    create_drop_delay_s: NonNeg = Field(
        default=0.0, description="Hold a dropped create this long before closing the connection"
    )
    create_script: list[CreateScriptItem] = Field(
        default_factory=list,
        description="Answers for the next creates, consumed in order: an HTTP status (4xx/5xx, "
        "nothing created) or 'drop' (execute, then close the connection)",
    )
    get_500_rate: Rate = Field(default=0.0, description="GET prediction/list answers 500")
    webhook_duplicate_rate: Rate = Field(default=0.0, description="Deliver an event twice")
    webhook_delay_rate: Rate = Field(default=0.0, description="Hold an event before delivery")
    webhook_delay_s: NonNeg = Field(default=30.0, description="How long a delayed event waits")
    webhook_drop_rate: Rate = Field(default=0.0, description="Never deliver an event")
    webhook_drop_events: list[EventKind] = Field(
        default_factory=list, description="Event kinds the drop rate applies to (empty: all)"
    )
    webhook_stale_rate: Rate = Field(
        default=0.0, description="First attempt carries a timestamp 10 min old (retries are fresh)"
    )
    completed_before_start_rate: Rate = Field(
        default=0.0, description="Hold 'start' until 'completed' was delivered"
    )

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, value: str) -> str:
        decode_secret(value)
        return value

    @field_validator("webhook_extra_secrets")
    @classmethod
    def _check_extra(cls, value: list[str]) -> list[str]:
        for secret in value:
            decode_secret(secret)
        return value

    @field_validator("create_script")
    @classmethod
    def _check_script(cls, value: list[CreateScriptItem]) -> list[CreateScriptItem]:
        for item in value:
            if isinstance(item, int) and not 400 <= item <= 599:
                raise ValueError("create_script statuses must be 4xx or 5xx (or 'drop')")
        return value

    @model_validator(mode="after")
    def _check_durations(self) -> FakeConfig:
        if self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must be >= min_duration_s")
        return self

    def signing_secrets(self) -> list[str]:
        return [self.webhook_secret, *self.webhook_extra_secrets]
