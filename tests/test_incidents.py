"""The restart budget counts incidents, not workers (service.pool.incidents; issue 22). Pure: times are given."""

from __future__ import annotations

from service.pool.incidents import Incidents

SIX = [f"engine worker {i} of 6" for i in range(1, 7)]


def test_six_workers_failing_together_are_one_incident_and_restart_together() -> None:
    budget = Incidents(limit=5, window=300, backoff_cap=30)
    found = [budget.fail(label, "stalled", now=100.0 + 0.25 * i) for i, label in enumerate(SIX)]
    assert [joined for _, joined in found] == [False] + [True] * 5
    assert {incident.number for incident, _ in found} == {1}
    assert {incident.restart_at for incident, _ in found} == {101.0}  # one backoff, the first incident's
    assert budget.in_window(110.0) == 1 and not budget.over_budget(110.0)
    for i, label in enumerate(SIX[:-1]):
        assert budget.recovered(label, now=130.0 + i) == []
    (closed,) = budget.recovered(SIX[-1], now=140.0)
    assert closed.number == 1 and closed.closed == 140.0 and not closed.open
    assert closed.public(150.0)["recovered_after_s"] == 40.0
    assert closed.public(150.0)["workers"] == SIX


def test_a_failure_after_the_incident_is_over_opens_the_next() -> None:
    budget = Incidents(limit=5, window=300, backoff_cap=30)
    budget.fail(SIX[0], "killed", now=0.0)
    budget.recovered(SIX[0], now=30.0)
    incident, joined = budget.fail(SIX[1], "killed", now=31.0)
    assert (incident.number, joined) == (2, False)
    assert incident.restart_at == 31.0 + 2.0  # the second incident in the window waits 2 s


def test_a_worker_failing_again_before_the_others_are_back_is_a_new_incident() -> None:
    """Each incident holds a worker once: a crash loop uses the budget as it did when crashes were counted."""
    budget = Incidents(limit=5, window=300, backoff_cap=30)
    budget.fail(SIX[0], "killed", now=0.0)
    budget.fail(SIX[1], "killed", now=0.1)
    incident, joined = budget.fail(SIX[0], "its restart failed", now=5.0)  # SIX[1] still down
    assert (incident.number, joined) == (2, False)
    incident, joined = budget.fail(SIX[1], "its restart failed", now=6.0)  # joins the newest, not in it yet
    assert (incident.number, joined) == (2, True)
    for n in range(3, 7):
        incident, _ = budget.fail(SIX[0], "its restart failed", now=10.0 * n)
        assert incident.number == n
    assert budget.over_budget(60.0), "six incidents within the window, more than five"
    assert [i.restart_at - i.opened for i in budget.history] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_incidents_older_than_the_window_leave_the_budget() -> None:
    budget = Incidents(limit=1, window=60, backoff_cap=30)
    budget.fail(SIX[0], "killed", now=0.0)
    budget.recovered(SIX[0], now=20.0)
    budget.fail(SIX[0], "killed", now=30.0)
    assert budget.over_budget(30.0)
    budget.recovered(SIX[0], now=50.0)
    budget.fail(SIX[0], "killed", now=80.0)
    assert budget.in_window(80.0) == 2 and budget.over_budget(80.0)  # 30 and 80
    assert budget.in_window(90.1) == 1 and not budget.over_budget(90.1)  # 80 only
    assert budget.public()["total"] == 3
