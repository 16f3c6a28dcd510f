"""Coarse clock offsets between agents from their (monotonic, realtime) readings."""

from tracer.agents.coordinator import realtime_offsets

DAY = 86400 * 10**9


def reading(mono, real):
    return [{"monotonic_ns": mono, "realtime_ns": real}]


def test_other_kernels_are_moved_by_their_uptime_difference():
    real = 1_800_000_000 * 10**9
    clocks = [reading(5 * DAY, real), reading(2 * DAY + 17, real + 3_000), reading(9 * DAY, real)]
    got = realtime_offsets(clocks, 0, {0: "boot-a", 1: "boot-b", 2: "boot-c"})
    assert got == {1: -3 * DAY + 17 - 3_000, 2: 4 * DAY}


def test_the_reference_kernel_and_unknown_clocks_are_left_alone():
    clocks = [reading(DAY, 10), reading(3 * DAY, 10), [], reading(7, 7)]
    domains = {0: "boot-a", 1: "boot-a", 2: "boot-b", 3: None}
    assert realtime_offsets(clocks, 0, domains) == {}
    assert realtime_offsets([[], reading(1, 1)], 0, {0: "a", 1: "b"}) == {}
