"""The tiny modes of paper_figures/fop.py and paper_figures/sngm.py end to end: the equal-budget protocol per batch
(same trials per method, damping in every second-order space, budget and space recorded in the JSON), the test
re-runs per seed, FOP's damping sweep with the damping diagnostic, and the pure helpers of fop.py."""
from __future__ import annotations

import json

from helpers import load_paper_script as load_script


def check_protocol(by_batch, names, trials, seeds, second_order):
    for batch, rec in by_batch.items():
        assert rec["trials"] == trials and list(rec["methods"]) == list(names)
        for name in names:
            m = rec["methods"][name]
            assert m["budget"]["trials"] == trials and m["budget"]["finished"] == trials, (batch, name)
            assert len(m["history"]) == trials
            assert ("damping" in m["space"]) == (name in second_order), (batch, name, m["space"])
            assert m["final"]["seeds"] == seeds and len(m["final"]["runs"]) == len(seeds)
            # the test re-runs evaluate on the test set, the trials on the validation split
            assert all("test_accuracy" in r and "val_accuracy" not in r for r in m["final"]["runs"])
            assert set(m["best"]["params"]) == set(m["space"])
            assert isinstance(m["on_edge"], list)


def test_fop_tiny(tmp_path):
    fop = load_script("fop")
    numbers = fop.main(["--mode", "tiny", "--out", str(tmp_path)])
    s = fop.SETTINGS["tiny"]
    for stem in ("fop_batch", "fop_damping"):
        for suffix in ("png", "pdf"):
            assert (tmp_path / f"{stem}.{suffix}").stat().st_size > 0
    saved = json.loads((tmp_path / "fop.json").read_text())
    assert saved["search_space"]["K-FAC"]["damping"] == fop.DAMPING and "damping" not in saved["search_space"]["SGD"]
    check_protocol(numbers["by_batch"], fop.NAMES, s["trials"], s["seeds"], {"K-FAC", "FOP"})
    largest = list(numbers["by_batch"])[-1]
    assert int(largest) == numbers["num_fit"]                 # "full": the whole fitting set, one step per epoch
    for name in ("K-FAC", "FOP"):
        runs = numbers["by_batch"][largest]["methods"][name]["final"]["runs"]
        assert all(r["damping"] and r["damping_ratio_mean"] > 0 for r in runs)   # the diagnostic of the tuned config
        sweep = numbers["damping_sweep"][name]
        assert [p["damping"] for p in sweep["points"]] == s["damping_grid"]
        assert sweep["lr"] == numbers["by_batch"][largest]["methods"][name]["best"]["params"]["lr"]
        ratios = [p["damping_ratio_mean"] for p in sweep["points"]]
        assert ratios == sorted(ratios)                          # more damping, larger damping / eigenvalue
    assert "SGD" not in numbers["damping_sweep"]
    text = (tmp_path / "fop_table1.txt").read_text()
    assert "epochs / seconds to 0.5" in text and "damping sweep" in text


def test_fop_helpers():
    fop = load_script("fop")
    assert [fop.inv_interval(6554, b) for b in (128, 1024, 6554)] == [10, 1, 1]
    assert fop.inv_interval(60000, 1024) == 10 and fop.inv_interval(60000, 8192) == 2
    assert fop.epochs_to([0.1, 0.4, 0.6, 0.7], 0.5) == 2 and fop.epochs_to([0.9, 0.4], 0.5) is None
    runs = [{"curve": [0.1, 0.6, 0.7], "curve_time": [0.0, 1.0, 2.0]},
            {"curve": [0.1, 0.4, 0.6], "curve_time": [0.0, 3.0, 5.0]},
            {"curve": [0.1, 0.2, None], "curve_time": [0.0, 1.0, 1.0]}]
    c = fop.cell(runs, 0.5, seconds=True)
    assert c["per_seed"] == [1, 2, None] and c["reached"] == 2 and c["epochs"] == 1.5 and c["seconds"] == 3.0
    assert c["text"] == "1.5 / 3s (2/3)"
    assert fop.cell(runs, 0.95, seconds=True)["text"] == "-"


def test_sngm_tiny(tmp_path):
    sngm = load_script("sngm")
    numbers = sngm.main(["--mode", "tiny", "--out", str(tmp_path)])
    s = sngm.SETTINGS["tiny"]
    for suffix in ("png", "pdf"):
        assert (tmp_path / f"sngm_accuracy_vs_batch.{suffix}").stat().st_size > 0
    assert (tmp_path / "sngm.json").is_file() and (tmp_path / "sngm_table.txt").is_file()
    check_protocol(numbers["by_batch"], sngm.NAMES, s["trials"], s["seeds"], set())
    for rec in numbers["by_batch"].values():
        lars = rec["methods"]["LARS"]
        assert set(lars["space"]) == {"lars_eta"} and lars["fixed"]["rule"] == "lars" and lars["fixed"]["lr"] == 1.0
    assert set(numbers["final_accuracy"]) == {"MSGD", "SNGM", "LARS"}
