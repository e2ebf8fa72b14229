"""Conveyor client SDK and the ``conveyor`` CLI (extra ``[cli]``).

``Client`` (blocking) and ``AsyncClient`` (asyncio) return typed results (:mod:`.types`);
``ConveyorClient``/``AsyncConveyorClient`` are the protobuf-level clients under them.
"""

from conveyor_client.client import AsyncConveyorClient
from conveyor_client.enums import EventType, Priority, TaskKind, TaskStatus, Tier
from conveyor_client.errors import ConveyorError, Violation
from conveyor_client.groups import GROUP_TERMINAL_STATUSES, delayed
from conveyor_client.options import (
    MAX_BATCH_ITEMS,
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    TokenProvider,
    build_spec,
    new_request_id,
)
from conveyor_client.sdk import AsyncClient, spec
from conveyor_client.sdk_sync import Client
from conveyor_client.sync import ConveyorClient
from conveyor_client.token import mint_token, minting_provider
from conveyor_client.types import (
    BatchSubmitted,
    OutputFile,
    Paused,
    QueueStat,
    Submitted,
    Task,
    TaskError,
    TaskEvent,
    TaskPage,
    Tenant,
    TenantLimits,
)

__all__ = [
    "GROUP_TERMINAL_STATUSES",
    "MAX_BATCH_ITEMS",
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "AsyncClient",
    "AsyncConveyorClient",
    "BatchSubmitted",
    "Client",
    "ConveyorClient",
    "ConveyorError",
    "EventType",
    "OutputFile",
    "Paused",
    "Priority",
    "QueueStat",
    "Submitted",
    "Task",
    "TaskError",
    "TaskEvent",
    "TaskKind",
    "TaskPage",
    "TaskStatus",
    "Tenant",
    "TenantLimits",
    "Tier",
    "TokenProvider",
    "Violation",
    "build_spec",
    "delayed",
    "mint_token",
    "minting_provider",
    "new_request_id",
    "spec",
]
