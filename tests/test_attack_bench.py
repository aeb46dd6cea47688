"""bench/attack.py: how the issue's goals are judged from the rows of a run."""

from __future__ import annotations

from bench import attack


def _row(case: str, **overrides) -> dict:
    row = {
        "case": case,
        "backend": "faiss",
        "fivexx": 0,
        "state_5xx": 0,
        "transport_errors": 0,
        "ready_200_in_5s": True,
        "search_after": 200,
        "health_max_ms": 5.0,
    }
    return {**row, **overrides}


def test_goals_pass_fail_and_not_measured():
    rows = [
        _row("deep_filter_i2t"),
        _row("truncate_image.npy", state_5xx=4),  # documented answers: not a failure
        _row("burst_16_max_images", health_max_ms=900.0, rss_growth=0.25),  # not single
        _row("kill9_change", stray_after_next_change=0),
    ]
    verdicts = {name: ok for name, ok, _ in attack.goals(rows)}
    assert verdicts["no 5xx over the cases"] is True
    assert verdicts["/health < 50 ms during any single bad request"] is True
    assert verdicts["burst of maximum-size images: RSS within 20% of the start, later"] is False
    assert verdicts["no stray files under <root>/files/ after the next change"] is True
    rows = [_row("max_image", fivexx=1, search_after=503, health_max_ms=60.0)]
    verdicts = {name: ok for name, ok, _ in attack.goals(rows)}
    assert verdicts["no 5xx over the cases"] is False
    assert verdicts["a search answers after each case"] is False
    assert verdicts["/health < 50 ms during any single bad request"] is False
    assert verdicts["no stray files under <root>/files/ after the next change"] is None
