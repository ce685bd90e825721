"""bench/charts.py: the SVG charts of a benchmark run, drawn from a results.json fixture shaped as
bench/bench.py writes it."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

from conftest import ROOT

CHARTS = ROOT / "bench" / "charts.py"
SVG = "{http://www.w3.org/2000/svg}"


def run(r, c, lat=20.0):
    return {"iops": r, "bw": r / 256, "lat_us": lat, "_c": c}


FIXTURE = {
    "card": "NVIDIA H200, 580.159.04, 5, 16, 143771 MiB", "date": "2026-11-30",
    "results": {
        # medians: py 30k / c 40k = 0.75 (IOPS counts for this job)
        "4K randread QD1": {"c": [run(40000, 1), run(38000, 1), run(42000, 1)],
                            "py": [run(30000, 0), run(29000, 0), run(31000, 0)]},
        # MiB/s counts here: py 5000 / c 4000 = 1.25
        "1M seq write QD8": {"c": [{"iops": 1, "bw": 4000.0, "lat_us": 1}], "py": [{"iops": 9, "bw": 5000.0, "lat_us": 1}]},
        "4K randwrite QD32 x4": {"c": [None], "py": [run(1000, 0)]},          # the C run failed
    },
    "footprint": {
        "c idle": {"vram_beyond_export_mib": 526, "pss_mib": 433.0},
        "py idle": {"vram_beyond_export_mib": 520, "pss_mib": 184.4},
    },
}


def draw(tmp_path, data):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return subprocess.run([sys.executable, str(CHARTS), str(src), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)


def test_ratio_chart_has_a_bar_per_job_at_its_median_ratio_and_the_parity_line(tmp_path):
    p = draw(tmp_path, FIXTURE)
    assert p.returncode == 0, p.stderr
    svg = ET.parse(tmp_path / "out" / "ratios.svg").getroot()
    bars = {b.get("data-job"): b for b in svg.iter(SVG + "rect") if b.get("class") == "bar"}
    assert {j: b.get("data-ratio") for j, b in bars.items()} == {"4K randread QD1": "0.75", "1M seq write QD8": "1.25"}
    texts = [t.text for t in svg.iter(SVG + "text")]
    assert "0.75×" in texts and "1.25×" in texts and "failed" in texts and "NVIDIA H200, 2026-11-30" in texts
    # widths scale with the ratio, from the same origin; the parity line sits at ratio 1
    w = {j: float(b.get("width")) for j, b in bars.items()}
    assert abs(w["1M seq write QD8"] / w["4K randread QD1"] - 1.25 / 0.75) < 0.01
    x0 = float(bars["4K randread QD1"].get("x"))
    (line,) = [e for e in svg.iter(SVG + "line") if e.get("class") == "parity"]
    assert abs(float(line.get("x1")) - x0 - w["4K randread QD1"] / 0.75) < 0.5
    assert bars["4K randread QD1"].get("fill") != bars["1M seq write QD8"].get("fill")   # below and above parity


def test_footprint_chart_shows_both_servers_vram_and_ram(tmp_path):
    assert draw(tmp_path, FIXTURE).returncode == 0
    svg = ET.parse(tmp_path / "out" / "footprint.svg").getroot()
    values = sorted((b.get("data-panel"), b.get("data-value")) for b in svg.iter(SVG + "rect") if b.get("class") == "bar")
    assert values == [("0", "520"), ("0", "526"), ("1", "184"), ("1", "433")]
    texts = [t.text for t in svg.iter(SVG + "text")]
    assert "C original, idle" in texts and "nbd_vram.py, idle" in texts


def test_not_a_results_file_is_one_line(tmp_path):
    p = draw(tmp_path, "{not json")
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "is not a results.json of bench/bench.py" in p.stderr
