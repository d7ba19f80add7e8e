"""The benchmark harness (curvlab.bench) and the hot-path kernels (curvlab.kernels).

No timing is asserted: the harness is checked for what it computes from given measurements (paired
ratios, quantiles, schema), and every optimized kernel is compared with its plain reference.
"""
import json
import math

import pytest
import torch
from torch import nn

import curvlab
from curvlab.bench import Variant, interleaved, paired_ratios
from curvlab.bench.cli import SCHEMA, main as bench_main
from curvlab.bench.harness import measure, optimizer_state_bytes, quantiles, tensor_bytes
from curvlab.kernels import GRAM_MIN_COLUMNS, all_finite, gram
from curvlab.stats import LayerStats
from helpers import assert_close


# -- kernels: optimized == plain -----------------------------------------------------------------------
@pytest.mark.parametrize("d", [7, GRAM_MIN_COLUMNS - 1, GRAM_MIN_COLUMNS, 301, 785])
@pytest.mark.parametrize("panels", [None, 1, 3])
def test_gram_equals_plain_product(float64, d, panels):
    x = torch.randn(37, d)
    got = gram(x, 0.25, panels=panels)
    assert_close(got, 0.25 * x.T @ x, rtol=1e-13, atol=1e-13, what=f"gram d={d} panels={panels}")
    assert_close(got, got.T, rtol=1e-14, atol=1e-14, what="gram symmetry")


def test_gram_float32_and_strided_input():
    x = torch.randn(300, 64).T                      # (64, 300), non-contiguous
    assert_close(gram(x), x.T @ x, rtol=1e-5, atol=1e-4, what="gram float32 strided")


def test_gram_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        gram(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="panels"):
        gram(torch.randn(3, 400), panels=0)


def _reference_finite(ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    cases = [[], [torch.randn(5, dtype=dtype)], [torch.randn(3, 4, dtype=dtype), torch.zeros(0, dtype=dtype)]]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(50, generator=gen).to(dtype)
        t[17] = bad
        cases.append([torch.randn(4, dtype=dtype), t])
    t = torch.randn(8, dtype=dtype)
    t[0], t[1] = float("inf"), -float("inf")              # inf - inf = nan in the sum: still flagged
    cases.append([t])
    cases.append([torch.full((4,), big, dtype=dtype)])     # finite entries whose sum overflows: not flagged
    cases.append([torch.tensor([big, -big, big], dtype=dtype)])
    for ts in cases:
        assert all_finite(ts) == _reference_finite(ts), [t.tolist() for t in ts]


def test_kron_factors_use_gram_and_equal_the_plain_formula(float64):
    """K-FAC factors of a wide layer (the panel path of gram) equal the plain (1/N) X^T X, (1/NT) g^T g."""
    from curvlab.adapters import find_adapter
    from curvlab.capture import LayerRecord, Use

    layer = nn.Linear(300, 270)
    adapter, _ = find_adapter(layer)
    x, g = torch.randn(16, 300), torch.randn(16, 270)
    rec = LayerRecord([Use(x, None, 0, real_grad=g)], real_scale=1.0)
    a, gg = LayerStats("l", layer, adapter, torch.float64, [rec]).kron_factors("real")
    xb = torch.cat([x, torch.ones(16, 1)], 1)
    assert_close(a, xb.T @ xb / 16, rtol=1e-13, atol=1e-14, what="A")
    assert_close(gg, g.T @ g / 16, rtol=1e-13, atol=1e-14, what="G")


# -- harness: what it computes from measurements -------------------------------------------------------
def test_interleaved_runs_round_robin_with_blocks():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved(steps, warmup=1, repeats=2, block={"a": 2, "b": 1})
    assert calls == ["a", "a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="clock"):
        interleaved(steps, clock="sundial")
    with pytest.raises(ValueError, match="block"):
        interleaved(steps, block={"a": 0})


def test_paired_ratios_pair_rounds_and_quantiles():
    times = {"sgd": [1.0, 2.0, 4.0], "x": [2.0, 3.0, 12.0]}
    assert paired_ratios(times, "sgd") == {"sgd": [1.0, 1.0, 1.0], "x": [2.0, 1.5, 3.0]}
    q = quantiles([2.0, 1.5, 3.0])
    assert (q["median"], q["q25"], q["q75"]) == (2.0, 1.75, 2.5)
    with pytest.raises(KeyError, match="reference"):
        paired_ratios(times, "adam")


def test_variant_parse_and_period():
    v = Variant.parse("kfac/fop:stat_interval=2,inv_interval=3,fisher=empirical")
    assert (v.estimator, v.rule, v.scaling) == ("kfac", "fop", "standard")
    assert v.hyper == {"stat_interval": 2, "inv_interval": 3, "fisher": "empirical"} and v.period == 6
    assert Variant.parse("shampoo").period == 10
    assert Variant.parse("kfac:gamma_adapt=true,inv_interval=5").period == 20            # gamma_interval 20
    assert Variant.parse("kfac:gamma_adapt=true,gamma_interval=4,damping_adapt=lm").period == 20
    for bad in ("", "a/b/c/d", "kfac:lr"):
        with pytest.raises(ValueError, match="variant"):
            Variant.parse(bad)


def test_state_bytes_counts_each_storage_once():
    t = torch.zeros(10)
    assert tensor_bytes({"a": t, "b": [t, t[:5]], "c": (torch.zeros(3, dtype=torch.float64),)}) == 40 + 24
    model = nn.Linear(4, 3)
    opt = curvlab.optimizer(model, "kfac", lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    # A (5x5), G (3x3) and their two inverses, float32
    assert optimizer_state_bytes(opt) == 4 * 2 * (25 + 9)


def test_measure_tiny_run_has_every_field():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    rows = measure(model, x, y, [Variant.parse("kfac:stat_interval=1,inv_interval=2"), Variant.parse("identity")],
                   repeats=2, clock="process")
    assert [r["label"] for r in rows][0] == "sgd" and len(rows) == 3
    for r in rows:
        assert r["ratio"] > 0 and math.isfinite(r["step_ms"]) and r["skipped_steps"] == 0
        assert r["ratio_q25"] <= r["ratio"] <= r["ratio_q75"]
        assert set(r["breakdown_ms"]) >= {"forward_backward", "other"}
    kfac = rows[1]
    assert kfac["period"] == 2 and set(kfac["breakdown_ms"]) >= {"statistics", "refresh", "precondition"}
    assert kfac["state_bytes"] > rows[2]["state_bytes"]


def test_cli_writes_stable_json_schema(tmp_path, capsys):
    path = tmp_path / "bench.json"
    out = bench_main(["--variant", "kfac:inv_interval=2", "--hidden", "8", "--batch", "8", "--repeats", "1",
                      "--threads", "1", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA == out["schema"]
    assert set(data) == {"schema", "environment", "settings", "cases"}
    assert {"torch", "threads", "device", "date"} <= set(data["environment"])
    (case,) = data["cases"]
    assert (case["batch"], case["hidden"]) == (8, [8])
    assert [r["label"] for r in case["rows"]] == ["sgd", "kfac/natural [inv_interval=2]"]
    row_keys = {"label", "period", "ratio", "ratio_q25", "ratio_q75", "step_ms", "breakdown_ms", "state_bytes",
                "peak_bytes", "skipped_steps"}
    assert all(row_keys <= set(r) for r in case["rows"])
    assert "ratio" in capsys.readouterr().out


def test_cli_transformer_rows_have_ratios_to_sgd_and_adamw(tmp_path, capsys):
    """``--model transformer``: a causal LM on random tokens, the transformer set (or --variant), AdamW timed
    alongside and every row's ratio to it."""
    path = tmp_path / "bench.json"
    bench_main(["--model", "transformer", "--variant", "kfac:inv_interval=2", "--variant", "identity/natural",
                "--hidden", "16", "--batch", "4", "--repeats", "1", "--threads", "1", "--json", str(path)])
    (case,) = json.loads(path.read_text())["cases"]
    labels = [r["label"] for r in case["rows"]]
    assert labels == ["sgd", "kfac/natural [inv_interval=2]", "identity/natural", "torch AdamW"]
    adamw = case["rows"][-1]
    for r in case["rows"]:
        assert r["skipped_steps"] == 0 and r["ratio"] > 0
        assert abs(r["ratio_to_adamw"] - r["ratio"] / adamw["ratio"]) < 1e-12
    assert "over torch AdamW's" in capsys.readouterr().out


def test_adaptive_damping_variants_step_with_a_closure():
    """damping_adapt needs opt.step(closure): the harness passes one and charges the re-evaluation to the step."""
    v = Variant.parse("kfac:damping_adapt=lm,damping_interval=3,stat_interval=1,inv_interval=2")
    assert v.hyper["damping_adapt"] == "lm" and v.period == 6
    assert Variant.parse("kfac/qmodel").period == 10 and Variant.parse("kfac:damping_adapt=lm").period == 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    rows = measure(model, x, y, [v, Variant.parse("kfac/qmodel:inv_interval=2")], repeats=1, clock="process")
    assert [r["label"] for r in rows][1:] == [v.label, "kfac/qmodel [inv_interval=2]"]
    for r in rows:
        assert r["ratio"] > 0 and r["skipped_steps"] == 0 and r["breakdown_ms"]["forward_backward"] > 0
