"""CI keeps bench/retrain_head.py working at smoke size, with the batched
refit agreeing with both loops of independent fits (times are not asserted;
the real numbers are in bench/RESULTS.md, "Ground truth for LDS")."""
import retrain_head


def test_retrain_head_smoke():
    row, = retrain_head.main(["--smoke"])
    assert row["usable"] == 5
    assert row["newton_max_output_diff"] < 1e-7 and row["lbfgs_max_output_diff"] < 1e-6, row
