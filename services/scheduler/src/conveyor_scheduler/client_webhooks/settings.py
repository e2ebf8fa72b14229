"""Client webhook settings of the scheduler (environment prefix ``SCHEDULER_WEBHOOK_``).

``SCHEDULER_WEBHOOK_ALLOW_HOSTS`` (comma-separated hostnames, addresses or CIDRs; empty by default)
exempts hosts from the SSRF policy at registration and allows plain ``http://`` to them. It must
match ``NOTIFIER_WEBHOOK_ALLOW_HOSTS``, which applies the same policy at connect time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor_common.sealing import Keyring, SealingError, is_sealed
from conveyor_common.ssrf import AllowList, Resolver, UrlPolicy, system_resolver


class WebhookSettings(BaseSettings):
    """Registration policy and limits."""

    model_config = SettingsConfigDict(
        env_prefix="SCHEDULER_WEBHOOK_", frozen=True, extra="ignore", use_attribute_docstrings=True
    )

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
    secret_keys: SecretStr | None = None
    """Keys sealing the tenants' signing secrets at rest (AES-256-GCM): ``<id>:<base64 of 32
    bytes>`` entries, comma-separated; the first seals, all open (rotation: put the new key first,
    keep the old ones until every replica resealed at start). Unset: secrets are stored in clear."""
    secret_keys_file: Path | None = None
    """File of sealing keys, one entry per line (read after ``SECRET_KEYS``)."""

    @model_validator(mode="after")
    def _keys(self) -> WebhookSettings:
        try:
            self.keyring()
        except (SealingError, OSError) as exc:
            raise ValueError(f"SCHEDULER_WEBHOOK_SECRET_KEYS(_FILE): {exc}") from None
        return self

    def keyring(self) -> Keyring | None:
        """The sealing keys, when configured."""
        value = self.secret_keys.get_secret_value() if self.secret_keys else None
        return Keyring.from_sources(value, self.secret_keys_file)

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

    @cached_property
    def url_policy(self) -> UrlPolicy:
        """The shared URL policy (conveyor_common.ssrf) with this allow-list and DNS bound."""
        return UrlPolicy(self.allow, self.settings.dns_timeout_seconds, self.resolver)

    @cached_property
    def codec(self) -> SecretCodec:
        """Seals and opens the signing secrets with the configured keys."""
        return SecretCodec(self.settings.keyring())


class SecretCodec:
    """Signing secrets at rest: sealed with the keyring (bound to their tenant), or in clear when
    no key is configured; a value stored in clear before keys were configured still opens."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring

    @staticmethod
    def _bound(tenant_id: str) -> str:
        return f"webhook-secret/{tenant_id}"

    def seal(self, tenant_id: str, secret: str) -> str:
        """What to store for ``secret``."""
        if self.keyring is None:
            return secret
        return self.keyring.seal(secret, self._bound(tenant_id))

    def open(self, tenant_id: str, stored: str) -> str:
        """The secret a stored value holds."""
        if not is_sealed(stored):
            return stored
        if self.keyring is None:
            raise SealingError(
                "a signing secret is sealed but SCHEDULER_WEBHOOK_SECRET_KEYS is unset"
            )
        return self.keyring.open(stored, self._bound(tenant_id))

    def needs_reseal(self, stored: str) -> bool:
        """Whether a stored value is in clear or sealed under an older key."""
        return self.keyring is not None and self.keyring.needs_reseal(stored)
