"""Dispatch wake-ups on a real replica: a full global limit is not re-checked for every submit, a
freed slot that nothing queued can take runs no cycle, and a freed slot still dispatches the next
task at once (not at the poll backstop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.admission.submit import NewTask, fingerprint
from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.dispatch.wakeups import payload_of
from conveyor_testkit import scheduler as kit
from tests.integration.dispatch_env import count_cycles, running_app, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def warm(engine: AsyncEngine) -> None:
    """Make the engine's first connection (connect and SQLAlchemy's dialect queries) before a
    timed announcement: on a loaded CI machine an announcement that made it took 0.42 s."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[SchedulerApp]:
    async with running_app(database_url, global_concurrency=1, instance_id="wakeups-test") as app:
        yield app


async def test_saturated_leader_skips_cycles_for_submits_but_not_for_freed_slots(
    app: SchedulerApp,
) -> None:
    first, _ = await app.core.submit_one("acme", 3, kit.item("w-0"))
    await wait_status(app, str(first["id"]), task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    dispatcher = app.loops.dispatcher
    for _ in range(100):  # the cycle after the dispatch reads the full limit
        if dispatcher.room.saturated:
            break
        await asyncio.sleep(0.01)
    assert dispatcher.room.saturated

    cycles = count_cycles(app)
    queued = []
    for i in range(1, 6):
        row, _ = await app.core.submit_one("acme", 3, kit.item(f"w-{i}"))
        queued.append(str(row["id"]))
    await asyncio.sleep(0.3)
    assert cycles[0] == 0  # new work only: the full limit cannot have changed

    await app.core.apply_results([kit.result(first["id"], 1, "started")])
    await app.core.apply_results([kit.result(first["id"], 1, "succeeded")])
    took = await wait_status(app, queued[0], task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    assert took < 2.0  # woken by the freed slot, not by the 30 s poll
    assert cycles[0] >= 1
    assert (await app.core.get_task("acme", queued[1])).status == task_pb2.TASK_STATUS_QUEUED


async def test_a_cycle_that_fills_the_limit_is_not_followed_by_one_reading_it_back(
    app: SchedulerApp,
) -> None:
    dispatcher = app.loops.dispatcher
    # A cycle's dispatch (a submit's own, dispatch/inline.py, is in test_scheduler_dispatch_inline).
    dispatcher.settings = dispatcher.settings.model_copy(update={"submit_dispatch": False})
    for _ in range(500):
        if app.loops.leader.is_leader:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the first cycles as leader found nothing to do
    cycles = count_cycles(app)
    row, _ = await app.core.submit_one("acme", 3, kit.item("only"))
    await wait_status(app, str(row["id"]), task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    await asyncio.sleep(0.3)
    assert dispatcher.room.saturated
    assert cycles[0] == 1  # the dispatching cycle; no second one to find the limit full


async def test_a_leader_held_by_the_window_runs_no_cycle_for_a_finished_task_but_one_for_a_begin(
    database_url: str,
) -> None:
    """With the dispatch window full (and slots to spare), a running task's end frees a slot but
    no window room: no cycle. A BeginSubmit takes a command out of the window: the next one is
    dispatched at once."""
    async with running_app(
        database_url,
        global_concurrency=10,
        dispatch_window=1,
        dispatch_window_min=1,
        dispatch_window_seconds=0.0,  # a fixed window of one command
        instance_id="window-wakeups-test",
    ) as app:
        ids = []
        for i in range(3):
            row, _ = await app.core.submit_one("acme", 3, kit.item(f"win-{i}"))
            ids.append(str(row["id"]))
        await wait_status(app, ids[0], task_pb2.TASK_STATUS_DISPATCHED, 5.0)
        await app.core.begin_submits([(ids[0], 1)])  # the first leaves the window...
        await app.core.complete_submits([(ids[0], 1, f"p-{ids[0]}-1")])
        await wait_status(app, ids[1], task_pb2.TASK_STATUS_DISPATCHED, 5.0)  # ...the second goes
        dispatcher = app.loops.dispatcher
        await asyncio.sleep(0.2)
        assert dispatcher.room.full == {"window"}

        cycles = count_cycles(app)
        await app.core.apply_results([kit.result(ids[0], 1, "succeeded")])
        await asyncio.sleep(0.3)
        assert cycles[0] == 0  # a slot freed, but the window is what is full
        assert (await app.core.get_task("acme", ids[2])).status == task_pb2.TASK_STATUS_QUEUED

        await app.core.begin_submits([(ids[1], 1)])
        took = await wait_status(app, ids[2], task_pb2.TASK_STATUS_DISPATCHED, 5.0)
        assert took < 2.0  # woken by the BeginSubmit, not by the 30 s poll
        assert cycles[0] >= 1


def test_notify_payload_names_what_changed() -> None:
    assert payload_of(new_work=True, frees=False) == "work"
    assert payload_of(new_work=False, frees=True) == "slots+window"
    assert payload_of(new_work=False, frees=True, window=False) == "slots"
    assert payload_of(new_work=False, frees=False, window=True) == "window"
    assert payload_of(new_work=True, frees=True) == "work+slots+window"
    assert payload_of(new_work=False, frees=False, relay_only=True) == "outbox"
    assert payload_of(new_work=True, frees=False, relay_only=True) == "work"
    assert payload_of(new_work=False, frees=False, window=True, outbox=False) == "window+nooutbox"
    assert payload_of(new_work=False, frees=True, outbox=False) == "slots+window+nooutbox"
    assert payload_of(new_work=False, frees=False, outbox=False) == "work+slots+window"


@pytest.mark.parametrize(
    ("payload", "stale", "slots", "window", "relay"),
    [
        ("work", True, False, False, True),
        ("slots", False, True, False, True),
        ("window", False, False, True, True),  # an older replica's begin: the relay too
        ("window+nooutbox", False, False, True, False),
        ("slots+window+nooutbox", False, True, True, False),
        ("work+slots", True, True, False, True),
        ("slot", False, True, True, True),  # an older replica's freed capacity
        ("work+slot", True, True, True, True),
        ("something+new", True, True, True, True),  # unknown: everything
        ("window+nooutbox+new", True, True, True, True),  # unknown: everything, the relay too
    ],
)
def test_a_notify_sets_what_its_payload_names(
    payload: str, stale: bool, slots: bool, window: bool, relay: bool
) -> None:
    from conveyor_scheduler.dispatch.wakeups import Wakeups

    w = Wakeups()
    w.candidates_stale = w.capacity_changed = w.window_changed = False
    w.notified(payload)
    assert (w.candidates_stale, w.capacity_changed, w.window_changed) == (stale, slots, window)
    assert w.dispatch.is_set()
    assert w.relay.is_set() == relay


async def test_a_relay_notify_wakes_only_the_leaders_relay(database_url: str) -> None:
    """'outbox' (a follower wrote events and nothing for the dispatcher) sets the relay's event and
    leaves the dispatcher's cache and capacity alone; anything else wakes both."""
    import psycopg

    from conveyor_scheduler.dispatch.wakeups import CHANNEL, Wakeups, WorkListener
    from conveyor_scheduler.settings import to_libpq_url

    wakeups = Wakeups()
    wakeups.local_leader = True
    listener = WorkListener(database_url, wakeups)
    listener.start()
    try:
        async with await psycopg.AsyncConnection.connect(
            to_libpq_url(database_url), autocommit=True
        ) as conn:
            for payload, dispatch in (("outbox", False), ("slot", True)):
                wakeups.candidates_stale = wakeups.capacity_changed = False
                wakeups.relay.clear()
                wakeups.dispatch.clear()
                for _ in range(100):  # until the listener is listening and the NOTIFY arrived
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                    await asyncio.sleep(0.02)
                    if wakeups.relay.is_set():
                        break
                assert wakeups.relay.is_set()
                assert wakeups.dispatch.is_set() == dispatch
                assert wakeups.capacity_changed == dispatch
    finally:
        await listener.stop()


def test_poke_marks_capacity_only_when_it_may_have_grown() -> None:
    from conveyor_scheduler.dispatch.wakeups import Wakeups

    w = Wakeups()
    w.capacity_changed = w.candidates_stale = w.window_changed = False
    w.poke(new_work=True, frees=False)
    assert (w.candidates_stale, w.capacity_changed, w.window_changed) == (True, False, False)
    w.candidates_stale = False
    w.poke(new_work=False)
    assert (w.candidates_stale, w.capacity_changed, w.window_changed) == (False, True, True)
    w.capacity_changed = w.window_changed = False
    w.poke(new_work=False, frees=True, window=False)
    assert (w.capacity_changed, w.window_changed) == (True, False)


async def test_work_announcer_announces_new_work_at_once_then_coalesces_a_burst(
    database_url: str,
) -> None:
    """After a quiet period a submit poke on a non-leader is announced at once; the rest of a burst
    makes ONE more 'work' NOTIFY after the work window; a freed slot is announced within the short
    window, ahead of it; a NOTIFY says 'nooutbox' only when none of the commits it announces wrote
    outbox rows."""
    import psycopg

    from conveyor_scheduler.dispatch.wakeups import CHANNEL, WorkAnnouncer
    from conveyor_scheduler.settings import to_libpq_url
    from conveyor_scheduler.store.db import create_engine

    engine = create_engine(database_url, pool_size=2)
    announcer = WorkAnnouncer(engine, 0.002, 0.3)
    listen = await psycopg.AsyncConnection.connect(to_libpq_url(database_url), autocommit=True)
    got: list[tuple[float, str]] = []
    arrived = asyncio.Event()

    async def collect() -> None:
        async for note in listen.notifies():
            got.append((time.monotonic(), note.payload))
            arrived.set()

    async def next_notify() -> None:
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), 2.0)

    try:
        await listen.execute(f"LISTEN {CHANNEL}")
        collector = asyncio.create_task(collect())
        await warm(engine)
        announcer.start()
        started = time.monotonic()
        announcer.request(new_work=True, frees=False)
        await next_notify()
        assert [p for _, p in got] == ["work"]
        assert got[0][0] - started < 0.2  # a lone submit does not wait for the work window
        for _ in range(50):
            announcer.request(new_work=True, frees=False)
            await asyncio.sleep(0.002)
        await next_notify()
        assert [p for _, p in got] == ["work", "work"]  # the whole burst: one more NOTIFY
        assert got[1][0] - got[0][0] >= 0.25  # ... after the work window
        await asyncio.sleep(0.35)  # quiet again: the next lone submit goes at once
        got.clear()
        started = time.monotonic()
        announcer.request(new_work=True, frees=False)
        await next_notify()
        assert got[0][0] - started < 0.2
        announcer.request(new_work=True, frees=False)  # inside the window: it would wait...
        await asyncio.sleep(0.01)
        announcer.request(new_work=False, frees=True)  # ...but a freed slot goes at once
        await next_notify()
        assert [p for _, p in got] == ["work", "work+slots+window"]
        assert got[1][0] - got[0][0] < 0.2  # the freed slot did not wait for the work window
        # New outbox rows only (a STARTED event on a follower): "outbox", also at once...
        announcer.request(new_work=True, frees=False)
        await asyncio.sleep(0.01)
        got.clear()
        started = time.monotonic()
        announcer.request(new_work=False, frees=False, relay_only=True)
        await next_notify()
        assert [p for _, p in got] == ["work"]  # ...merged with what was pending: not relay-only
        assert got[0][0] - started < 0.2
        await asyncio.sleep(0.01)
        announcer.request(new_work=False, frees=False, relay_only=True)
        await next_notify()
        assert [p for _, p in got] == ["work", "outbox"]
        # Window room from commits that wrote no outbox rows (BeginSubmit): the relay stays
        # asleep, unless a request merged into the same NOTIFY wrote some.
        await asyncio.sleep(0.01)
        announcer.request(new_work=False, frees=False, window=True, outbox=False)
        await next_notify()
        assert got[-1][1] == "window+nooutbox"
        await asyncio.sleep(0.01)
        announcer.request(new_work=True, frees=False)  # pending in the work window...
        announcer.request(new_work=False, frees=False, window=True, outbox=False)
        await next_notify()
        assert got[-1][1] == "work+window"  # ...the submit wrote its event: the relay wakes
        collector.cancel()
    finally:
        await announcer.stop()
        await listen.close()
        await engine.dispose()


def test_an_announcer_is_quiet_for_work_only_outside_its_work_window() -> None:
    """What a follower's submit transaction asks before carrying the NOTIFY itself: nothing pending
    and no NOTIFY (sent, or carried by a transaction) within the work window."""
    from conveyor_scheduler.dispatch.wakeups import Wakeups, WorkAnnouncer

    announcer = WorkAnnouncer(None, 0.002, 0.3)  # type: ignore[arg-type]  # never started
    wakeups = Wakeups()
    wakeups.announcer = announcer
    assert announcer.quiet_for_work()
    assert wakeups.work_to_announce() == "work"
    announcer.carried()  # a submit's transaction carried it
    assert not announcer.quiet_for_work()
    assert wakeups.work_to_announce() is None  # within the window: the announcer coalesces
    announcer._last_sent -= 0.3
    assert wakeups.work_to_announce() == "work"
    announcer.request(new_work=True, frees=False)  # one is pending already
    assert wakeups.work_to_announce() is None
    wakeups.local_leader = True  # the leader's own submits wake it in process
    assert wakeups.work_to_announce() is None


async def test_freed_capacity_goes_at_once_after_a_quiet_period_then_once_per_window(
    database_url: str,
) -> None:
    """A follower's freed slot (or its new outbox rows) is announced at once when nothing was
    announced for the short window; while they keep coming, at most once per window."""
    import psycopg

    from conveyor_scheduler.dispatch.wakeups import CHANNEL, WorkAnnouncer
    from conveyor_scheduler.settings import to_libpq_url
    from conveyor_scheduler.store.db import create_engine

    engine = create_engine(database_url, pool_size=2)
    announcer = WorkAnnouncer(engine, 0.8, 0.8)  # a long window, to tell "at once" apart
    listen = await psycopg.AsyncConnection.connect(to_libpq_url(database_url), autocommit=True)
    got: list[tuple[float, str]] = []
    try:
        await listen.execute(f"LISTEN {CHANNEL}")
        await warm(engine)
        announcer.start()
        await asyncio.sleep(0.9)  # quiet
        started = time.monotonic()
        announcer.request(new_work=False, frees=True, window=False)
        announcer.request(new_work=False, frees=False, relay_only=True)  # the same moment
        async with asyncio.timeout(2.0):
            async for note in listen.notifies():
                got.append((time.monotonic(), note.payload))
                if len(got) == 1:
                    announcer.request(new_work=False, frees=True, window=False)  # right after
                if len(got) == 2:
                    break
        assert [p for _, p in got] == ["slots", "slots"]
        assert got[0][0] - started < 0.4  # at once: no window to wait after a quiet period
        assert got[1][0] - got[0][0] >= 0.75  # the next one waits out the window
    finally:
        await announcer.stop()
        await listen.close()
        await engine.dispose()


@pytest.fixture
async def roomy_app(database_url: str) -> AsyncIterator[SchedulerApp]:
    """A leader whose global limit is far from full (the lifted-limits shape)."""
    async with running_app(
        database_url, global_concurrency=100, instance_id="roomy-wakeups-test"
    ) as app:
        yield app


async def test_a_leader_with_room_and_nothing_queued_runs_no_cycle_for_freed_slots(
    roomy_app: SchedulerApp,
) -> None:
    """Limits far from full and every queued task dispatched: a task's end frees a slot, and a
    BeginSubmit window room, that nothing can take, so no cycle runs for them (each was a
    transaction reading the whole capacity). A submit still goes out at once: it dispatches itself
    (dispatch/inline.py), and with that turned off a cycle takes it at once."""
    app = roomy_app
    ids = []
    for i in range(3):
        row, _ = await app.core.submit_one("acme", 3, kit.item(f"roomy-{i}"))
        ids.append(str(row["id"]))
    for tid in ids:
        await wait_status(app, tid, task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    await asyncio.sleep(0.2)
    cycles = count_cycles(app)
    await app.core.begin_submits([(tid, 1) for tid in ids])
    await app.core.complete_submits([(tid, 1, f"p-{tid}-1") for tid in ids])
    await app.core.apply_results([kit.result(tid, 1, "succeeded") for tid in ids])
    await asyncio.sleep(0.3)
    assert cycles[0] == 0

    row, _ = await app.core.submit_one("acme", 3, kit.item("roomy-next"))
    task = await app.core.get_task("acme", str(row["id"]))
    assert task.status == task_pb2.TASK_STATUS_DISPATCHED  # in the submit's own transaction
    assert cycles[0] == 0

    dispatcher = app.loops.dispatcher
    dispatcher.settings = dispatcher.settings.model_copy(update={"submit_dispatch": False})
    row, _ = await app.core.submit_one("acme", 3, kit.item("roomy-cycle"))
    took = await wait_status(app, str(row["id"]), task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    assert took < 0.5  # new work: a cycle at once, not the ~1 s heartbeat wake
    assert cycles[0] >= 1


async def test_a_slot_freed_by_a_tenant_at_its_limit_dispatches_its_next_task(
    roomy_app: SchedulerApp,
) -> None:
    """A tenant at its own limit with tasks still queued (global room to spare): its freed slot
    wakes a cycle that dispatches the next one, without any new submit."""
    app = roomy_app
    limit = app.core.policy.tenant_limit(1, None)  # tier 1: the free tier's slots
    ids = []
    for i in range(limit + 1):
        row, _ = await app.core.submit_one("acme", 1, kit.item(f"at-limit-{i}"))
        ids.append(str(row["id"]))
    for tid in ids[:limit]:
        await wait_status(app, tid, task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    await asyncio.sleep(0.2)
    assert (await app.core.get_task("acme", ids[-1])).status == task_pb2.TASK_STATUS_QUEUED
    assert not app.loops.dispatcher.nothing_queued()
    await app.core.apply_results([kit.result(ids[0], 1, "succeeded")])
    took = await wait_status(app, ids[-1], task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    assert took < 0.5  # not the leader's ~1 s heartbeat wake


async def test_a_delayed_task_goes_out_on_time_after_the_queue_ran_dry(
    roomy_app: SchedulerApp,
) -> None:
    """A delayed task is queued but not yet dispatchable: the cycle that finds nothing else leaves
    the dispatcher drained, and the task still goes out at its time (not at the 30 s poll)."""
    app = roomy_app
    spec = kit.spec(prompt="later")
    spec.delay.FromMilliseconds(400)
    row, _ = await app.core.submit_one("acme", 3, NewTask("delayed", spec, fingerprint(spec)))
    await asyncio.sleep(0.2)
    assert (await app.core.get_task("acme", str(row["id"]))).status == task_pb2.TASK_STATUS_QUEUED
    took = await wait_status(app, str(row["id"]), task_pb2.TASK_STATUS_DISPATCHED, 5.0)
    assert took < 0.5  # due 0.2 s from here; not the leader's ~1 s heartbeat wake


async def test_a_slot_freed_in_a_full_model_dispatches_its_next_task(database_url: str) -> None:
    """A model at its limit hides its queued tasks from the candidate read (global and tenant room
    to spare): the read finds nothing else, yet the model's freed slot must wake a cycle that
    dispatches its next task, without any new submit."""
    async with running_app(
        database_url,
        global_concurrency=100,
        model_limits={"acme/img": 1},
        instance_id="model-wakeups-test",
    ) as app:
        first, _ = await app.core.submit_one("acme", 3, kit.item("model-0"))
        await wait_status(app, str(first["id"]), task_pb2.TASK_STATUS_DISPATCHED, 5.0)
        # Submitted while the model is full: the cycle it wakes reads no candidate at all.
        second, _ = await app.core.submit_one("acme", 3, kit.item("model-1"))
        await asyncio.sleep(0.3)
        assert (await app.core.get_task("acme", str(second["id"]))).status == (
            task_pb2.TASK_STATUS_QUEUED
        )
        await app.core.apply_results([kit.result(first["id"], 1, "succeeded")])
        took = await wait_status(app, str(second["id"]), task_pb2.TASK_STATUS_DISPATCHED, 5.0)
        assert took < 0.5  # woken by the freed model slot, not by the lease's ~1 s heartbeat
