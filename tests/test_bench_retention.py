"""The retention benchmark's arithmetic and outputs: d50 interpolation, the CSV columns, a well-formed chart."""
import csv
import io
import xml.etree.ElementTree as ET

from mplus.bench_retention import MODELS, d50, summary, to_csv
from mplus.chart import line_chart


def test_d50_interpolates_to_half_the_distance_zero_accuracy():
    assert d50([0, 100, 200], [1.0, 0.8, 0.4]) == 175  # 0.5 is 3/4 of the way from 0.8 to 0.4
    assert d50([0, 100, 200], [0.8, 0.4, 0.1]) == 100  # reaching exactly half counts
    assert d50([0, 100, 200], [0.9, 0.8, 0.6]) is None  # never halves within the measured range


RESULT = {"distances": [0, 4, 16], "tokens": [0.0, 240.4, 961.0], "episodes": 10,
          "accuracy": {"mplus": [1.0, 0.9, 0.7], "memoryllm": [1.0, 0.6, 0.2], "no_context": [0.1, 0.1, 0.1]},
          "recall": [[0, 0, 0.0, 0], [8, 16, 0.1, 1], [30, 64, 0.4, 4]]}


def test_csv_has_one_row_per_model_and_distance():
    rows = list(csv.DictReader(io.StringIO(to_csv(RESULT))))
    assert list(rows[0]) == ["model", "distance_tokens", "accuracy", "n"]
    assert [(r["model"], r["distance_tokens"]) for r in rows] == [(m, t) for m in MODELS for t in ("0", "240", "961")]
    assert rows[4]["accuracy"] == "0.6000" and rows[4]["n"] == "10"


def test_summary_reports_d50_ratio_and_recall():
    text = summary(RESULT)
    # memoryllm halves between 240 (0.6) and 961 (0.2): 240.4 + 720.6 * 0.1 / 0.4 = 420.55; mplus never halves
    assert "memoryllm 421 tokens" in text and "mplus > 961 tokens" in text
    assert "d50 ratio mplus / memoryllm: >= 2.3" in text
    assert "recall of the fact's LTM rows: 0.475 vs random 0.100" in text  # 38/80 vs 0.5/5


def test_chart_is_well_formed_svg(tmp_path):
    line_chart({"a": [(0, 1.0), (100, 0.5)], "b": [(0, 0.2), (100, 0.1)]}, tmp_path / "c.svg", title="t",
               x_label="x", y_label="y")
    root = ET.parse(tmp_path / "c.svg").getroot()
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
