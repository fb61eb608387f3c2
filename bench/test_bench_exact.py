"""CI keeps bench/exact_whole_call.py working: its smoke sizes, with exemplar's
exact top-10 agreeing with the chunked closed form (times are not asserted;
the real numbers are in bench/RESULTS.md)."""
import exact_whole_call


def test_exact_whole_call_smoke():
    rows = exact_whole_call.main(["--smoke"])
    assert {row["method"] for row in rows} == {"if", "theta_relatif", "l_relatif"}
    for row in rows:
        assert row["overlap"] >= 0.99 and row["diff"] <= 1e-4, row


# docs/design.md §2 shows these: top-10 overlap with exact on digits (bench/approximation_quality.py).
DOCUMENTED = {
    ("kfac", "eigenbasis", None): {"if": 0.73, "theta_relatif": 0.82, "l_relatif": 0.85},
    ("kfac", "factored", None): {"if": 0.69, "theta_relatif": 0.79, "l_relatif": 0.83},
    ("ekfac", "eigenbasis", None): {"if": 0.73, "theta_relatif": 0.82, "l_relatif": 0.85},
    ("ekfac", "eigenbasis", "auto"): {"if": 0.73, "theta_relatif": 0.82, "l_relatif": 0.85},
    ("identity", "eigenbasis", None): {"if": 0.40, "theta_relatif": 0.63, "l_relatif": 0.63},
}


def test_documented_approximation_quality_holds():
    import approximation_quality

    measured = approximation_quality.overlaps()
    for key, row in DOCUMENTED.items():
        for method, value in row.items():
            assert abs(measured[key][method] - value) <= 0.02, (key, method, measured[key][method])


def test_large_head_smoke():
    import large_head

    for row in large_head.main(["--smoke"]):
        assert row["overlap"] >= 0.9, row  # tiny sizes; the real overlaps are in bench/RESULTS.md
