"""Exact-time wake-ups: when to sweep again before the next tick."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from dispatcher.wakeups import schedule_minute, wake_times

NOW = datetime(2026, 12, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_each_run_is_woken_for_when_it_enters_the_prefetch_window():
    due = [at(15.2), at(40), at(40.4), at(100)]
    times = wake_times(due, now=NOW, horizon_seconds=60, prefetch_seconds=10)
    # 5.2 s -> the next whole second; 30 and 30.4 share a second; 90 s is past the horizon.
    assert times == [
        datetime(2026, 12, 1, 12, 0, 6, tzinfo=timezone.utc),
        datetime(2026, 12, 1, 12, 0, 31, tzinfo=timezone.utc),
    ]
    for moment in times:
        assert any(timedelta(0) <= moment - (d - timedelta(seconds=10)) < timedelta(seconds=1) for d in due)


def test_runs_already_claimable_get_no_wake_up():
    assert wake_times([at(5), at(9.7)], now=NOW, horizon_seconds=60, prefetch_seconds=10) == []


def test_a_run_claimable_a_moment_after_the_tick_still_gets_one():
    [moment] = wake_times([at(10.5)], now=NOW, horizon_seconds=60, prefetch_seconds=10)
    assert moment == datetime(2026, 12, 1, 12, 0, 1, tzinfo=timezone.utc)


def test_the_schedule_fires_in_the_minute_before_the_moment():
    """EventBridge Scheduler fires `at(hh:mm:00)` somewhere in hh:mm:00–59."""
    for moment in (at(1), at(59.75), at(61), at(3600)):
        fires = schedule_minute(moment)
        assert fires.second == 0 and fires.microsecond == 0
        assert fires + timedelta(seconds=60) <= moment  # the latest firing is still before the moment
        assert moment - fires < timedelta(seconds=121)  # and the wait after the earliest is bounded
