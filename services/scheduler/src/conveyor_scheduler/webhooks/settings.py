"""Client webhook settings of the scheduler (environment prefix ``SCHEDULER_WEBHOOK_``).

``SCHEDULER_WEBHOOK_ALLOW_HOSTS`` (comma-separated hostnames, addresses or CIDRs; empty by default)
exempts hosts from the SSRF policy at registration and allows plain ``http://`` to them. It must
match ``NOTIFIER_WEBHOOK_ALLOW_HOSTS``, which applies the same policy at connect time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor_common.ssrf import AllowList, Resolver, system_resolver


class WebhookSettings(BaseSettings):
    """Registration policy and limits."""

    model_config = SettingsConfigDict(env_prefix="SCHEDULER_WEBHOOK_", frozen=True, extra="ignore")

    allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts/addresses/CIDRs exempt from the SSRF policy (and allowed over http)."""
    max_endpoints_per_tenant: int = Field(default=20, ge=1, le=1000)
    """Registered endpoints a tenant may have (per-task webhooks not counted)."""
    default_rotation_overlap_seconds: int = Field(default=86_400, ge=0)
    """How long the previous secret keeps signing when a rotation does not say."""
    max_rotation_overlap_seconds: int = Field(default=30 * 86_400, ge=0)
    """Longest overlap a rotation may ask for."""
    dns_timeout_seconds: float = Field(default=3.0, gt=0, le=30)
    """Time limit of the registration-time DNS resolution."""

    @field_validator("allow_hosts", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _check(cls, value: list[str]) -> list[str]:
        AllowList.parse(value)
        return value


@dataclass(frozen=True)
class WebhookPolicy:
    """What the webhook RPCs need besides the database: settings, allow-list, resolver."""

    settings: WebhookSettings = field(default_factory=WebhookSettings)
    resolver: Resolver = system_resolver

    @property
    def allow(self) -> AllowList:
        """The parsed allow-list."""
        return AllowList.parse(self.settings.allow_hosts)
