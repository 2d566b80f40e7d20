"""The response tracker's queue: first in, first out, over long pipelines too, with the
rules for COPY IN, errors (skip to Sync) and ReadyForQuery."""

from __future__ import annotations

from gateway.proxy.tracker import Expectation, Kind, ResponseTracker


def _tracker(*kinds: Kind) -> tuple[ResponseTracker, list[Expectation]]:
    tracker = ResponseTracker()
    made = [Expectation(kind) for kind in kinds]
    for e in made:
        tracker.expect(e)
    return tracker, made


def test_expectations_leave_in_the_order_they_came() -> None:
    tracker, made = _tracker("parse", "bind", "execute", "sync")
    assert len(tracker) == 4 and tracker
    assert tracker.front() is made[0]
    assert [tracker.pop() for _ in range(4)] == made
    assert not tracker and len(tracker) == 0
    assert tracker.front() is None and tracker.pop() is None
    assert tracker.added == 4


def test_a_long_pipeline_keeps_its_order_while_it_is_answered() -> None:
    """Thousands of expectations queued and taken while more arrive: none is lost, none
    is answered twice, the count stays exact."""
    tracker = ResponseTracker()
    queued: list[Expectation] = []
    taken: list[Expectation] = []
    for i in range(5000):
        e = Expectation("execute" if i % 2 else "bind")
        queued.append(e)
        tracker.expect(e)
        if i % 3 == 2:
            front = tracker.pop()
            assert front is not None
            taken.append(front)
        assert len(tracker) == len(queued) - len(taken)
    assert tracker.pending() == tuple(queued[len(taken) :])
    while tracker:
        front = tracker.pop()
        assert front is not None
        taken.append(front)
    assert taken == queued


def test_copy_ends_outside_copy_are_dropped_at_the_front() -> None:
    tracker, made = _tracker("copy_end", "copy_end", "query")
    assert tracker.front() is made[2]
    assert len(tracker) == 1


def test_a_stray_copy_end_is_dropped_wherever_it_comes_to_the_front() -> None:
    """front() and pop() look for stray copy ends only while one is queued (they count
    them): one behind other expectations, and one queued after a copy that kept it, are
    still dropped when they reach the front."""
    tracker, made = _tracker("query", "copy_end", "sync", "copy_end")
    assert tracker.pop() is made[0]
    assert tracker.front() is made[2]
    assert tracker.pop() is made[2]
    assert tracker.front() is None and not tracker
    later = Expectation("copy_end")
    tracker.expect(later)
    tracker.expect(made[0])
    assert tracker.pop() is made[0]
    tracker, made = _tracker("query", "sync", "copy_end", "copy_end", "query")
    assert tracker.copy_in_started() is True
    assert tracker.pending() == (made[0], made[3], made[4])
    assert tracker.pop() is made[0]
    assert tracker.front() is made[4]
    tracker, made = _tracker("copy_end", "query")
    tracker.clear()
    tracker.expect(made[1])
    assert tracker.front() is made[1]


def test_an_error_skips_to_the_sync() -> None:
    tracker, made = _tracker("bind", "execute", "sync", "query")
    assert tracker.skip_to_sync() == made[:2]
    assert tracker.pop() is made[2]
    assert tracker.pending() == (made[3],)


def test_copy_in_drops_the_syncs_until_the_copy_ends() -> None:
    """The front statement is the one copying; the syncs the client sent before its
    CopyDone go (the server ignores them), the CopyDone's own mark too; what follows stays."""
    tracker, made = _tracker("query", "sync", "parse", "sync", "copy_end", "sync", "query")
    assert tracker.copy_in_started() is True
    assert tracker.pending() == (made[0], made[2], made[5], made[6])


def test_copy_in_not_ended_by_the_client_yet() -> None:
    tracker, made = _tracker("query", "sync", "bind")
    assert tracker.copy_in_started() is False
    assert tracker.pending() == (made[0], made[2])


def test_ready_for_query_leaves_a_pipeline_open_only_with_extended_messages_queued() -> None:
    tracker, _ = _tracker("bind", "sync")
    assert tracker.unsynced and tracker.ran_unsynced
    tracker.pop()
    tracker.pop()
    tracker.ready()
    assert not tracker.unsynced and not tracker.ran_unsynced
    tracker.expect(Expectation("describe_statement"))
    tracker.ready()
    assert tracker.unsynced and not tracker.ran_unsynced
    assert not tracker.running() and tracker.running_one() is None
    tracker.expect(executing := Expectation("execute"))
    assert tracker.running() and tracker.running_one() is executing
    assert tracker.holds(executing) and not tracker.holds(Expectation("execute"))
    assert [e.kind for e in tracker.clear()] == ["describe_statement", "execute"]
    assert not tracker and tracker.front() is None


def test_executes_unsynced_count_the_pipeline_since_its_last_sync() -> None:
    """The Executes of the implicit transaction a pipeline is in: those queued after the
    last Sync (or Query), not those of a pipeline synced before it."""
    tracker, _ = _tracker("bind", "execute", "sync", "bind", "execute")
    assert tracker.executes_unsynced() == 1
    tracker.expect(Expectation("bind"))
    tracker.expect(Expectation("execute"))
    assert tracker.executes_unsynced() == 2
    tracker.expect(Expectation("sync"))
    assert tracker.executes_unsynced() == 0
    tracker.expect(Expectation("query"))
    tracker.expect(Expectation("execute"))
    assert tracker.executes_unsynced() == 1
