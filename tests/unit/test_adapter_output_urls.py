"""conveyor_provider_adapter.storage: output URLs found in strings, lists and dicts; the output host allow-list."""

from __future__ import annotations

from conveyor_provider_adapter.storage import host_allowed, output_urls

# ---- outputs ---------------------------------------------------------------------------------


def test_output_urls_in_strings_lists_and_dicts() -> None:
    assert output_urls("https://replicate.delivery/a.png") == ["https://replicate.delivery/a.png"]
    assert output_urls(["https://x/1.png", "text", 3, None, "http://y/2.mp4"]) == [
        "https://x/1.png",
        "http://y/2.mp4",
    ]
    assert output_urls({"image": "https://x/1.png", "meta": {"mask": "https://x/m.png"}}) == [
        "https://x/1.png",
        "https://x/m.png",
    ]
    assert output_urls("just text") == []
    assert output_urls(None) == []


def test_output_hosts_allow_list() -> None:
    allowed = ["replicate.delivery", "*.replicate.delivery"]
    assert host_allowed("replicate.delivery", allowed)
    assert host_allowed("pbxt.replicate.delivery", allowed)
    assert host_allowed("PBXT.Replicate.Delivery.", allowed)
    assert not host_allowed("replicate.delivery.evil.com", allowed)
    assert not host_allowed("evilreplicate.delivery", allowed)
    assert not host_allowed("169.254.169.254", allowed)
    assert not host_allowed("localhost", allowed)
