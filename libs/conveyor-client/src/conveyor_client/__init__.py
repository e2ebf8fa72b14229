"""Conveyor client SDK (async and sync) and the ``conveyor`` CLI."""

from conveyor_client.client import (
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    AsyncConveyorClient,
    ConveyorClient,
    build_spec,
    new_request_id,
)
from conveyor_client.errors import ConveyorError, Violation
from conveyor_client.groups import GROUP_TERMINAL_STATUSES, delayed
from conveyor_client.token import mint_token

__all__ = [
    "GROUP_TERMINAL_STATUSES",
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "AsyncConveyorClient",
    "ConveyorClient",
    "ConveyorError",
    "Violation",
    "build_spec",
    "delayed",
    "mint_token",
    "new_request_id",
]
