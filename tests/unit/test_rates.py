"""producer/rates.py: per-second figures over a window."""

from dalishare.producer.rates import Rate


def test_a_rate_is_the_growth_over_the_window():
    rate = Rate(window=10)
    assert rate.per_s(now=0) == 0.0
    for t in range(0, 21):
        rate.update(100 * t, now=float(t))
    assert abs(rate.per_s(now=20.0) - 100.0) < 1e-6
    assert rate.total == 2000


def test_a_rate_drops_to_zero_when_nothing_grows():
    rate = Rate(window=5)
    rate.update(0, now=0.0)
    rate.update(50, now=1.0)
    assert rate.per_s(now=1.0) == 50.0
    assert rate.per_s(now=7.0) == 0.0  # no update for more than a window
    for t in range(2, 9):
        rate.update(50, now=float(t))  # updates, but the total stays
    assert rate.per_s(now=8.0) == 0.0
