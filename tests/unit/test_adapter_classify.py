"""conveyor_provider_adapter.classify: progress from tqdm logs, failure and create-status classification."""

from __future__ import annotations

import pytest

from conveyor_provider_adapter.classify import classify_error, classify_status, parse_progress
from conveyor_provider_adapter.replicate import (
    ClientError,
    error_from_response,
)
from tests.unit.adapter_support import response_of

# ---- progress and classification ------------------------------------------------------------


def test_progress_is_the_last_tqdm_percentage() -> None:
    logs = (
        "Using seed: 1234\n"
        "  0%|          | 0/50 [00:00<?, ?it/s]\n"
        " 24%|██▍       | 12/50 [00:01<00:03, 10.1it/s]\r"
        " 48%|████▊     | 24/50 [00:02<00:02, 10.2it/s]\n"
        "some other line\n"
    )
    assert parse_progress(logs) == 48
    assert parse_progress("100%|██████████| 50/50 [00:05<00:00]") == 100
    assert parse_progress(" 33%|###3      |") == 33
    assert parse_progress("no progress here, 50% of nothing") is None
    assert parse_progress("") is None
    assert parse_progress(None) is None


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", "capacity", True),
        ("Prediction timed out", "timeout", True),
        ("NSFW content detected. Try running it again, or try a different prompt.", "nsfw", False),
        ("Invalid input: width must be a multiple of 8", "invalid_input", False),
        ("Unauthenticated", "auth", False),
        ("Internal server error", "provider_error", True),
        ("ValueError: something in the model", "model_error", False),
        (None, "model_error", False),
    ],
)
def test_failures_are_classified(error: str | None, code: str, retryable: bool) -> None:
    assert classify_error(error) == (code, retryable)


def test_create_statuses_are_classified() -> None:
    assert classify_status(401) == ("auth", False)
    assert classify_status(404) == ("not_found", False)
    assert classify_status(422) == ("invalid_input", False)
    assert classify_status(429) == ("rate_limited", True)
    assert classify_status(400) == ("invalid_input", False)
    assert classify_status(413) == ("invalid_input", False)
    assert classify_status(403) == ("auth", False)
    assert classify_status(408) == ("timeout", True)
    assert classify_status(409) == ("conflict", True)
    assert classify_status(425) == ("timeout", True)


@pytest.mark.parametrize("status", [408, 409, 425])
def test_passing_4xx_on_create_is_a_definite_answer_that_allows_a_new_attempt(status: int) -> None:
    err = error_from_response(
        response_of(status, {"detail": "x"}), create=True, default_retry_after=5
    )
    assert isinstance(err, ClientError)  # nothing was created: never ambiguous
    assert classify_status(err.status)[1] is True
