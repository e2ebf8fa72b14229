"""Tenants' webhook signing secrets at rest: sealed with AES-GCM under a key id, unreadable in the
database, still opened (and resealed) after a key rotation, refused by a keyring without the key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from conveyor_common.sealing import Keyring, SealingError
from conveyor_scheduler.client_webhooks.secrets import current_secret, reseal_secrets, rotate_secret
from conveyor_scheduler.client_webhooks.settings import SecretCodec, WebhookSettings
from conveyor_scheduler.store import db
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

K1, K2 = Keyring.generate_entry("k1"), Keyring.generate_entry("k2")


def codec(*entries: str) -> SecretCodec:
    return SecretCodec(Keyring.parse(",".join(entries)))


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    await kit.migrate(database_url)
    engine = db.create_engine(database_url, pool_size=2)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM webhook_secrets"))
    try:
        yield async_sessionmaker(engine, expire_on_commit=False)
    finally:
        await engine.dispose()


async def stored(sessions: async_sessionmaker[AsyncSession], tenant: str) -> tuple[str, str | None]:
    async with sessions() as session:
        row = (
            await session.execute(
                text(
                    "SELECT current_secret, previous_secret FROM webhook_secrets"
                    " WHERE tenant_id = :t"
                ),
                {"t": tenant},
            )
        ).one()
        return row[0], row[1]


async def test_secrets_are_sealed_and_survive_a_key_rotation(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        secret = await current_secret(session, "acme", codec(K1))
    assert secret.startswith("whsec_")
    current, _ = await stored(sessions, "acme")
    assert current.startswith("sealed:v1:k1:")
    assert secret not in current
    assert secret.removeprefix("whsec_") not in current

    # Rotation of the sealing key: the new key first, the old one still opens.
    rotated = codec(K2, K1)
    async with sessions() as session, session.begin():
        assert await current_secret(session, "acme", rotated) == secret
        assert await reseal_secrets(session, rotated) == 1
        assert await reseal_secrets(session, rotated) == 0
    current, _ = await stored(sessions, "acme")
    assert current.startswith("sealed:v1:k2:")
    async with sessions() as session, session.begin():
        assert await current_secret(session, "acme", codec(K2)) == secret
        with pytest.raises(SealingError):
            await current_secret(session, "acme", codec(K1))

    # A rotation of the signing secret keeps the previous one, sealed too, for the overlap.
    async with sessions() as session, session.begin():
        rotation = await rotate_secret(session, "acme", "rot-1", 3600, codec(K2))
    assert rotation.secret != secret
    current, previous = await stored(sessions, "acme")
    assert previous is not None
    assert current.startswith("sealed:v1:k2:")
    assert previous.startswith("sealed:v1:k2:")
    assert codec(K2).open("acme", previous) == secret
    assert codec(K2).open("acme", current) == rotation.secret
    # A sealed value copied into another tenant's row does not open there.
    with pytest.raises(SealingError):
        codec(K2).open("other", current)


async def test_secrets_stored_in_clear_are_sealed_once_keys_are_configured(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        secret = await current_secret(session, "legacy", SecretCodec(None))
    assert (await stored(sessions, "legacy"))[0] == secret
    async with sessions() as session, session.begin():
        assert await reseal_secrets(session, codec(K1)) == 1
    assert (await stored(sessions, "legacy"))[0].startswith("sealed:v1:k1:")
    async with sessions() as session, session.begin():
        assert await current_secret(session, "legacy", codec(K1)) == secret
        with pytest.raises(SealingError, match="unset"):
            await current_secret(session, "legacy", SecretCodec(None))


def test_bad_sealing_keys_stop_the_scheduler_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEDULER_WEBHOOK_SECRET_KEYS", "k1:not-a-key")
    with pytest.raises(ValueError, match="SCHEDULER_WEBHOOK_SECRET_KEYS"):
        WebhookSettings()
    monkeypatch.setenv("SCHEDULER_WEBHOOK_SECRET_KEYS", f"{K2},{K1}")
    keyring = WebhookSettings().keyring()
    assert keyring is not None
    assert keyring.current == "k2"
