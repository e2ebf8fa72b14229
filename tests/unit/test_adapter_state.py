"""conveyor_provider_adapter.state: the LRU forgets the least recently used."""

from __future__ import annotations

from conveyor_provider_adapter.state import LRU

# ---- LRU and settings ------------------------------------------------------------------------


def test_lru_forgets_the_least_recently_used() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)
    assert "b" not in lru
    assert "a" in lru
    assert len(lru) == 2
