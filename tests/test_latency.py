"""Latency model and calibration: the prior is marked as such, a table changes predictions toward measurements,
tables are written atomically and carry the device's identity, and `calibrate` refuses emulators."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error

from edgeprune.artifacts import LatencyTable, LayerCost, LayerPlan, TableEntry
from edgeprune.cost import model as latency
from edgeprune.cost import rows, table
from edgeprune.cost.model import LatencyModel, model_for
from edgeprune.cost.table import load_table, save_table
from edgeprune.targets import get_target


def _layer(op: str, flops: int, nbytes: int, shape=(1, 8, 8, 16), kernel: str = "") -> LayerCost:
    return LayerCost(op=op, shapes=(shape, shape), macs=flops // 2, act_bytes=nbytes, weight_bytes=0,
                     out_bytes=nbytes, kernel=kernel or op)


def _entries(*entries) -> LatencyTable:
    return LatencyTable(device={"uri": "local"}, entries=[TableEntry(f"n{i}", *e) for i, e in enumerate(entries)])


def test_prior_uses_the_targets_roofline():
    from dataclasses import replace

    a7, a53 = get_target("cortex-a7"), get_target("cortex-a53")
    conv = [_layer("conv", 100_000_000, 1_000_000)]
    p7, p53 = model_for(a7).predict(conv), model_for(a53).predict(conv)
    assert p7.source == "prior"
    # One fp32 MAC per cycle per A7 core against eight FLOP per cycle on an A53: the A7 must come out slower.
    assert p7.ms > 2 * p53.ms
    # 1e8 FLOP on 4 cores x 1 GHz x 2 FLOP/cycle at the conv efficiency: 25 ms / efficiency, plus dispatch.
    expected = 1e8 / (4 * 1e9 * 2) * 1e3 / latency.PRIOR_EFFICIENCY["conv"] + latency.PRIOR_OVERHEAD_MS
    # The same layer in int8 is priced at the target's int8 rate, in binary at its popcount rate.
    int8 = LayerCost(**{**conv[0].__dict__, "weight_bits": 8, "act_bits": 8})
    binary = LayerCost(**{**conv[0].__dict__, "weight_bits": 1, "act_bits": 1})
    m7 = model_for(a7)
    assert m7.predict(conv).ms > m7.predict([int8]).ms > m7.predict([binary]).ms
    # A board file without fitted constants keeps the generic roofline.
    generic = model_for(replace(a7, prior_eff_pointwise=0.0)).predict(conv)
    assert generic.ms == pytest.approx(expected, rel=1e-6)


def test_fit_recovers_a_linear_device():
    """A synthetic device whose conv time is exactly 3x compute + 2x memory + 0.01 ms: the fit finds it."""
    target = get_target("cortex-a7")
    rng = np.random.default_rng(0)
    entries = []
    for _ in range(12):
        layers = [_layer("conv", int(rng.integers(1e6, 1e8)), int(rng.integers(1e4, 1e6))) for _ in range(3)]
        ms = 0.0
        for layer in layers:
            compute, memory = latency.terms(layer, target, None)
            ms += 3 * compute + 2 * memory + 0.01
        entries.append(TableEntry("n", layers, ms))
    model = LatencyModel(target).fit(entries)
    a, b, c = model.coef["conv"]
    assert a == pytest.approx(3, rel=1e-3) and b == pytest.approx(2, rel=1e-2) and c == pytest.approx(0.01, rel=1e-2)
    p = model.predict([_layer("conv", 5_000_000, 50_000)])
    assert p.source == "fitted"


def _conv(cin: int, cout: int, k: int, size: int, depthwise: bool = False) -> LayerCost:
    return rows.conv(cin, cout, k, 1, size, depthwise=depthwise)


def test_rows_say_what_a_convolution_does():
    """The class is explicit, not read back from FLOPs: a 1x1 over 16 channels is pointwise however few its MACs."""
    assert _conv(16, 96, 1, 32).op == "pointwise" and _conv(16, 96, 1, 32).macs == 32 * 32 * 96 * 16
    assert _conv(96, 96, 5, 32, depthwise=True).op == "depthwise"
    assert _conv(96, 96, 5, 32, depthwise=True).macs == 32 * 32 * 96 * 25
    assert _conv(3, 32, 3, 64).op == "conv"
    assert rows.dense(1280, 10).op == "matmul" and rows.dense(1280, 10).macs == 12800


def test_rows_carry_bits_density_and_blocks():
    """A 1xN block-sparse int8 pointwise layer: MACs scale with density, weight bytes with bits (plus one index per
    block), and its key differs from the dense layer's so a measured dense time is never used for it."""
    dense = rows.conv(64, 128, 1, 1, 16)
    sparse = rows.conv(64, 128, 1, 1, 16, plan=LayerPlan("x", "bsr", weight_bits=8, act_bits=8, block=4,
                                                            density=0.25))
    assert sparse.macs == dense.macs // 4
    kept = 64 * 128 // 4
    assert sparse.weight_bytes == kept + 4 * (kept // 4) + 4 * 128  # int8 weights, block indices, fp32 bias
    assert sparse.act_bytes == dense.act_bytes // 4
    assert sparse.key() != dense.key()
    with pytest.raises(ValueError, match="unknown operator class"):
        rows.layer_cost("winograd", [(1, 8, 8, 8)], [], [(1, 8, 8, 8)])


def test_per_kernel_fit_prices_each_class_by_its_own_rate():
    """A device where pointwise runs at 4x the FLOP rate of depthwise, timed per kernel: the fit recovers both rates
    and prices unseen shapes within 1%; a whole-network fit could not tell the two apart within one kind."""
    target = get_target("host")
    rng = np.random.default_rng(1)

    def true_ms(layer: LayerCost) -> float:
        compute, memory = latency.terms(layer, target, None)
        rate = 1.0 if layer.op == "pointwise" else 4.0
        return rate * compute + 0.5 * memory + 0.003

    entries = []
    for _ in range(10):
        layers = []
        for _ in range(4):
            cin, mid = int(rng.choice([8, 16, 24, 48, 96])), int(rng.choice([32, 96, 192]))
            size, k = int(rng.choice([8, 16, 32])), int(rng.choice([3, 5, 7]))
            layers += [_conv(cin, mid, 1, size), _conv(mid, mid, k, size, depthwise=True)]
        entries.append(TableEntry("n", layers, sum(map(true_ms, layers)), [true_ms(x) for x in layers]))
    model = LatencyModel(target).fit(entries)
    assert set(model.coef) == {"pointwise", "depthwise"}
    assert model.coef["pointwise"][0] == pytest.approx(1.0, rel=1e-3)
    assert model.coef["depthwise"][0] == pytest.approx(4.0, rel=1e-3)
    unseen = [_conv(40, 320, 1, 12), _conv(320, 320, 3, 12, True)]
    model.measured.clear()  # price by the fit, not by lookup
    assert model.predict(unseen).ms == pytest.approx(sum(map(true_ms, unseen)), rel=1e-2)


def test_measured_kernels_are_looked_up():
    target = get_target("host")
    layer = _layer("conv", 1_000_000, 10_000)
    model = LatencyModel(target).fit([TableEntry("n", [layer], 0.5, [0.5])])
    p = model.predict([layer])
    assert p.source == "measured" and p.ms == pytest.approx(0.5)


def test_tables_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "dev.json"
    save_table(path, LatencyTable(device={"uri": "local"}))
    before = path.read_text()

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(table.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        save_table(path, _entries(([], 1.0)))
    assert path.read_text() == before  # the old table, whole
    assert [p.name for p in tmp_path.iterdir()] == ["dev.json"]  # no temporary left behind


def test_a_damaged_table_is_a_one_line_error(tmp_path, cli):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Exception) as e:
        load_table(bad)
    assert "re-run edgeprune calibrate" in str(e.value)


def test_calibrate_refuses_emulators_and_off_host_local(cli, tmp_path):
    rc, _, err = cli("calibrate", "--target", "cortex-a7", "--device", "qemu://cortex-a7", "-o", tmp_path / "t.json")
    assert rc == 2
    assert_one_line_error(err, "qemu")
    rc, _, err = cli("calibrate", "--target", "cortex-a7", "--device", "local", "-o", tmp_path / "t.json")
    assert rc == 2
    assert_one_line_error(err, "rpc://")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_calibrate_writes_a_table_with_identity_and_predict_uses_it(cli, tmp_path):
    table = tmp_path / "host.json"
    rc, out, err = cli("calibrate", "--count", "3", "--runs", "5", "--warmup", "1", "-o", table, "--quiet")
    assert rc == 0, err
    data = json.loads(table.read_text())
    assert data["device"]["uri"] == "local" and data["device"]["target"] == "host"
    assert data["tool_version"] and data["date"] and len(data["entries"]) == 3
    assert all(e["ms"] > 0 and e["layers"] for e in data["entries"])
    # Timed on local: every kernel's share of the run, from the profile.
    assert all(sum(e["per_kernel_ms"]) == pytest.approx(e["ms"], rel=1e-6) for e in data["entries"])
    assert len(data["entries"][2]["layers"]) > 20  # every third build is a whole subnet of the search space
    # and every other subnet is quantized: the table times int8 kernels at 8 bits
    assert sum(row["family"] == "int8" and row["weight_bits"] == 8 for row in data["entries"][2]["layers"]) > 10
    # and every third piece has its 1x1 layers pruned in 1xN blocks: the table times block-sparse kernels
    assert any(row["family"] == "bsr" and row["density"] < 1 and row["block"] in (4, 8, 16)
               for row in data["entries"][1]["layers"])

    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU()).eval()
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(onnx_path), opset_version=17, dynamo=False,
                      input_names=["input"])
    rc, _, err = cli("compile", onnx_path, "-o", tmp_path / "b")
    assert rc == 0, err
    rc, out, _ = cli("predict", tmp_path / "b", "--json")
    assert json.loads(out)["source"] == "prior"
    rc, out, _ = cli("predict", tmp_path / "b", "--table", table, "--json")
    assert json.loads(out)["source"] in ("fitted", "measured")


def test_table_entries_keep_each_kernels_share_and_price_elided_kernels_at_zero():
    from dataclasses import replace
    from types import SimpleNamespace

    from edgeprune.artifacts import Measurement
    from edgeprune.cost import entry_of

    layers = [replace(_conv(16, 96, 1, 8), kernel="pw"), _layer("data", 0, 384, kernel="view"),
              replace(_conv(96, 96, 3, 8, depthwise=True), kernel="dw")]
    build = SimpleNamespace(directory="/x/cal007", layers=layers)
    profile = [{"name": "pw", "ms": 0.3, "calls": 1}, {"name": "dw", "ms": 0.1, "calls": 1}]  # "view" never ran
    entry = entry_of(build, Measurement("local", "host", [0.8, 0.8, 0.8], 2, layers=profile))
    assert entry.name == "cal007" and entry.ms == pytest.approx(0.8)
    assert entry.per_kernel_ms == pytest.approx([0.6, 0.0, 0.2])  # shares of the whole run, summing to it
    profile = [{"name": "pw", "ms": 0.3, "calls": 1}]  # a compute kernel missing: no per-kernel times at all
    assert entry_of(build, Measurement("local", "host", [0.8], 2, layers=profile)).per_kernel_ms is None


def test_a_version_1_table_is_read_and_keeps_its_fit(tmp_path):
    """A table calibrated by the previous version (untyped kernel dicts) still prices: its rows are converted, the
    class read as version 1 read it, and a round trip through save keeps every figure."""
    def v1(cin, cout, k, size, depthwise=False):
        per_out = k * k * (1 if depthwise else cin)
        return {"kernel": "c", "kind": "dwconv" if depthwise or per_out <= 49 else "conv",
                "flops": 2 * size * size * cout * per_out, "act_bytes": 4 * size * size * cin,
                "weight_bytes": 4 * cout * per_out, "out_bytes": 4 * size * size * cout,
                "shapes": [[1, size, size, cin], [k, k, cin, cout], [1, size, size, cout]]}

    layers = [v1(16, 96, 1, 8), v1(96, 96, 3, 8, depthwise=True), v1(3, 32, 3, 16)]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "device": {"uri": "local"}, "threads": None,
                                "entries": [{"name": "a", "layers": layers, "ms": 1.0, "per_kernel_ms": None}]}))
    t = load_table(path)
    assert [r.op for r in t.entries[0].layers] == ["pointwise", "depthwise", "conv"]
    assert t.entries[0].layers[0].macs == 8 * 8 * 96 * 16
    save_table(tmp_path / "new.json", t)
    again = load_table(tmp_path / "new.json")
    assert again.entries == t.entries and json.loads((tmp_path / "new.json").read_text())["version"] == 2


def test_arm_priors_are_fitted_and_carry_the_band_of_their_boards():
    """The ARM targets' priors come from published figures (bench/prior.py): fitted per class, scaling sub-linearly
    with threads, with the spread of boards as a band; a measured table replaces both."""
    a7 = get_target("cortex-a7")
    assert a7.prior_fitted and a7.prior_sources and a7.prior_band[0] < 1 < a7.prior_band[1]
    conv = [rows.conv(256, 256, 1, 1, 28)]
    one, four = LatencyModel(a7, threads=1).predict(conv), LatencyModel(a7, threads=4).predict(conv)
    assert one.source == "prior" and one.band == (a7.prior_band[0], a7.prior_band[1])
    overhead = a7.prior_overhead_us / 1e3
    assert (one.ms - overhead) / (four.ms - overhead) == pytest.approx(4 ** a7.prior_thread_scaling, rel=1e-6)
    assert one.band_ms[1] == pytest.approx(one.ms * a7.prior_band[1])
    fitted = model_for(a7, _entries(([rows.conv(64, 64, 1, 1, 28)], 1.0)))
    assert fitted.predict(conv).band == (1.0, 1.0)  # the device's own figures: no spread of other boards
    assert not get_target("host").prior_fitted and model_for(get_target("host")).predict(conv).band == (1.0, 1.0)


@pytest.mark.slow
def test_calibration_suite_times_binary_kernels_in_the_other_whole_subnets(tmp_path):
    """The whole subnets not quantized have every other 1x1 layer binary (ReCU codes, untrained): compiled, each of
    them is a bit-packed kernel whose cost row carries 1-bit weights and activations, beside dense rows."""
    from edgeprune.calibration import suite
    from edgeprune.codegen import compile_model

    net = suite(6)[5]
    binary = [name for name, plan in net.plan.items() if plan.scheme == "binary"]
    assert len(binary) > 3
    build = compile_model(net, "host", tmp_path / "b")
    rows = [row for row in build.layers if row.family == "binary"]
    assert len(rows) == len(binary) and all(r.weight_bits == 1 and r.act_bits == 1 for r in rows)
    assert sum(row.family == "dense" and row.op == "pointwise" for row in build.layers) >= len(binary) - 1


def test_a_local_measurement_knows_when_other_processes_shared_the_cpus(tmp_path):
    """OthersBusy: processes spinning on every CPU while we sleep are seen as most of the machine; our own busy loop
    is not counted as others'. A Measurement above the threshold is contended and says so in one line."""
    import os
    import subprocess
    import sys
    import time

    from edgeprune.artifacts import Measurement
    from edgeprune.measure.local import OthersBusy

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs Linux's /proc/stat")
    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)  # the spinners are running
        with OthersBusy() as others:
            time.sleep(1.0)
    finally:
        for p in procs:
            p.wait()
    assert others.share is not None and others.share > 0.6
    # Our own busy loop is not the others': what others used is at most what our loop left of the machine
    # (counted as others', the loop would push the share to 1 whatever else runs).
    cpu0, t = os.times(), time.monotonic()
    with OthersBusy() as own:
        while time.monotonic() - t < 1.0:
            pass
    cpu1, wall = os.times(), time.monotonic() - t
    left = 1 - (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall * (os.cpu_count() or 1))
    assert own.share is not None and own.share <= left + 0.05
    m = Measurement("local", "host", [1.0, 1.1], 2, others_busy=others.share)
    assert m.contended and "not the build's alone" in m.contention_note()
    assert not Measurement("local", "host", [1.0], 2, others_busy=0.05).contended
    assert m.summary()["others_busy"] == round(others.share, 3)


def test_one_profiled_network_scales_each_class_by_its_own_kernels():
    """A device that runs dense 1x1 layers at 1.5x the prior's time and 1x4 block-sparse ones at 3x: after one
    profiled network (fewer than the fit needs), an unseen sparse layer is priced at 3x, not at the networks' mix."""
    target = get_target("host")
    prior = LatencyModel(target)
    sparse = LayerPlan("x", "bsr", block=4, density=0.5)
    layers = [rows.conv(cin, cout, 1, 1, size, plan=plan) for cin, cout, size in
              ((16, 96, 40), (96, 24, 40), (24, 144, 20), (144, 32, 20), (32, 192, 10)) for plan in (None, sparse)]
    truth = [prior.prior_ms(r) * (3.0 if r.family == "bsr" else 1.5) for r in layers]
    model = LatencyModel(target).fit([TableEntry("n", layers, sum(truth), truth)])
    assert model.class_scale == pytest.approx({"pointwise": 1.5, "pointwise/bsr": 3.0})
    unseen = rows.conv(48, 288, 1, 1, 14, plan=sparse)
    p = model.predict([unseen])
    assert p.source == "fitted" and p.ms == pytest.approx(3.0 * prior.prior_ms(unseen), rel=1e-6)
    # the one scale for every class would have priced it well below what it runs at
    assert model.scale * prior.prior_ms(unseen) < 0.8 * p.ms
    # a class with fewer timed kernels than MIN_CLASS_KERNELS keeps the networks' scale
    few = LatencyModel(target).fit([TableEntry("n", layers[:4], sum(truth[:4]), truth[:4])])
    assert few.class_scale == {}
