"""CI keeps bench/exact_whole_call.py working: its smoke sizes, with exemplar's
exact top-10 agreeing with the chunked closed form (times are not asserted;
the real numbers are in bench/RESULTS.md)."""
import exact_whole_call


def test_exact_whole_call_smoke():
    rows = exact_whole_call.main(["--smoke"])
    assert {row["method"] for row in rows} == {"if", "theta_relatif", "l_relatif"}
    for row in rows:
        assert row["overlap"] >= 0.99 and row["diff"] <= 1e-4, row
