"""CI keeps bench/screen_cpu.py and bench/screen_int8.py working at smoke size:
the screen's answers equal exact's, and the int8 bound keeps every exact top-k
row (times are not asserted; the real numbers are in bench/RESULTS.md,
"Screens on the CPU")."""
import screen_cpu
import screen_int8


def test_screen_benchmarks_smoke():
    for path, kfac_damping in (("general", "eigenbasis"), ("rank1", "factored")):
        left, train = screen_cpu.operands(2_000, 40, 24, 3, kfac_damping)
        row = screen_cpu.measure(path, left, train, 5, 1)
        assert row["same_indices"] == 1.0 and row["differ_beyond_ties"] == 0, row
        row = screen_int8.measure(path, left, train, 5)  # asserts the int8 bound kept the exact top-k
        assert 5 <= row["int8_survivors_per_row"] <= 2_000, row
