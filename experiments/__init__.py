"""Reproductions of the papers' findings on real data: `python -m experiments NAME [--quick]`,
run from the repository root. Each experiment writes results/NAME/README.md
(tables) and PNG figures. This folder is not part of the installed library: it
uses exemplar's public API and the library never imports it."""
from __future__ import annotations

from . import barshan, lds, sui, timing

EXPERIMENTS = {
    "barshan-table1": (barshan.table1, "Barshan Table 1 + Fig. 3-4 grid: influential-set cardinality and probability"),
    "barshan-convnet": (barshan.convnet_table1, "Barshan Table 1 (ConvNet half) + Fig. 5 grid: 16C-32C-64C-F ConvNet"),
    "barshan-loo": (barshan.leave_one_out, "Barshan Tables 2, 4 and Fig. 6: leave-one-out retraining"),
    "barshan-knn": (barshan.knn_overlap, "Barshan §4.3: overlap of top-k with the k nearest neighbours"),
    "barshan-surnames": (barshan.surnames, "Barshan Table 3: character-level GRU on surnames, IF vs RelatIF"),
    "sui-debugging": (sui.debugging, "Sui Fig. 4: data debugging with flipped labels (German credit, XGBoost)"),
    "sui-representers": (sui.representers, "Sui Table 4, Table 6 / Fig. 3b, Fig. 1b: RPS-l2 vs RPS-LJE"),
    "thesis-timing": (timing.running_time, "Thesis Table 2: time per test point, IF vs RelatIF"),
    "lds": (lds.lds_table, "LDS and leave-one-out per method x curvature: heads (digits, Fashion-MNIST ConvNet, "
                           "IMDB BERT) and a whole MLP retrained end to end"),
}
