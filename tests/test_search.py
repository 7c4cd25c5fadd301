"""The search space, supernet weight sharing, PSS-Net pools, the knapsack and supernet training."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from edgeprune.models.zoo import count_macs
from edgeprune.search import knapsack, pools, space
from edgeprune.search.supernet import Supernet, extract


def test_space_spans_the_targets_budgets():
    sp = space.Space()
    largest, smallest = space.macs(sp.largest(224)), space.macs(sp.smallest(64))
    mbv2_half_128 = space.macs(space.uniform(0.5, 128))
    # 50 ms on a 4xA7 holds ~80-110M MACs in fp32: the space must reach past that, and far below MBv2-0.5 @128
    assert largest > 300e6
    assert smallest < mbv2_half_128 / 10
    assert 29e6 < mbv2_half_128 < 33e6  # MobileNetV2-0.5 @128 is ~31M MACs with 10 classes


def test_random_archs_are_valid_and_macs_are_exact():
    sp = space.Space()
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = sp.sample(rng)
        assert all(w % space.GROUP == 0 for w in (a.stem, a.first, a.last, *a.widths))
        assert all(m % space.GROUP == 0 for ms in a.mids for m in ms)
        assert all(d in space.depth_choices(md) for d, (_, md, _) in zip(a.depths, space.STAGES))
        assert space.Arch.from_dict(a.to_dict()) == a
    a = sp.sample(rng)
    net = extract(Supernet(10), a)
    assert count_macs(net, torch.zeros(1, 3, a.resolution, a.resolution)) == space.macs(a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extracted_subnet_computes_what_the_supernet_does(seed):
    """Reference: the supernet's own elastic forward (slices and kernel transforms) in eval mode."""
    torch.manual_seed(seed)
    net = Supernet(10)
    with torch.no_grad():  # non-trivial BN statistics and kernel transforms
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "t75"):
                m.t75.add_(0.05 * torch.randn_like(m.t75))
                m.t53.add_(0.05 * torch.randn_like(m.t53))
    net.eval()
    a = space.Space(resolutions=(64, 80)).sample(np.random.default_rng(seed))
    x = torch.randn(2, 3, a.resolution, a.resolution)
    with torch.no_grad():
        ref = net(x, a)
        ours = extract(net, a).eval()(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_sorting_channels_keeps_the_largest_subnet_function():
    torch.manual_seed(0)
    net = Supernet(10).eval()
    a = net.largest().replace(resolution=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x, a)
        net.sort_channels()
        after = net(x, a)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    block = net.stages[2][0]
    norms = block.project.weight.abs().sum(dim=(0, 2, 3))
    assert bool((norms[:-1] >= norms[1:]).all())


def _brute_force(values, costs, owner, capacity):
    groups = [np.flatnonzero(owner == k) for k in range(owner.max() + 1)]
    best = None
    for combo in itertools.product(*groups):
        c = costs[list(combo)].sum()
        v = values[list(combo)].sum()
        if c <= capacity + 1e-9 and (best is None or v > best):
            best = v
    return best


@pytest.mark.parametrize("seed", range(6))
def test_multiple_choice_knapsack_is_exact(seed):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(4), rng.integers(2, 5, 4))
    values = rng.uniform(0, 10, len(owner))
    costs = rng.uniform(-2, 5, len(owner))
    capacity = float(rng.uniform(0, 8))
    picked = knapsack.multiple_choice(values, costs, owner, capacity)
    best = _brute_force(values, costs, owner, capacity)
    if best is None:
        assert picked is None
        return
    assert sorted(owner[picked]) == list(range(4))  # one option per item
    assert costs[picked].sum() <= capacity + 1e-6
    assert values[picked].sum() == pytest.approx(best, rel=1e-9)


def test_knapsack_meets_the_budget_and_spends_it():
    """With importance equal everywhere, the solver must fill the budget: a budget between two pool subnets."""
    arch = space.uniform(0.5, 80, 3, 6)
    wide = knapsack.widest(arch)
    imp = {it.name: np.ones(max(it.options)) for it in knapsack.items_of(arch)}
    assert set(imp) >= {"stem", "first", "last", "stage0", "mid2.3"}

    def lat(a):
        return space.macs(a) / 1e6  # a stand-in latency model: 1 ms per million MACs

    for budget in (0.6 * lat(arch), 1.5 * lat(arch)):
        choice = knapsack.solve(arch, imp, lat, budget)
        assert choice is not None and choice.predicted_ms <= budget
        assert choice.predicted_ms >= 0.85 * budget  # the budget is used, not left on the table
        assert choice.arch.depths == arch.depths and choice.arch.kernels == arch.kernels
        assert all(w <= m for w, m in zip(choice.arch.widths, wide.widths))
    assert knapsack.solve(arch, imp, lat, 0.01) is None


def test_pools_sample_their_bucket_and_keep_the_best():
    sp = space.Space(resolutions=(64, 80, 96))

    def lat(a):
        return space.macs(a) / 1e6

    edges = pools.bucket_edges(lat(sp.smallest(64)), lat(sp.largest(96)) * 1.001, 4)
    p = pools.Pools(sp, edges, lat, size=3)
    rng = np.random.default_rng(0)
    p.build_prior(rng, draws=600)
    for b in range(4):
        genes = p.draw(b, rng)
        assert p.bucket(lat(sp.decode(genes))) == b
    for i, score in enumerate([-3.0, -1.0, -2.0, -0.5]):
        p.update(0, (i,), score)
    assert len(p.pools[0]) == 3 and (0,) not in p.pools[0]  # the worst was evicted
    p.update(0, (1,), 0.0)
    assert p.pools[0][(1,)] == pytest.approx(0.9 * -1.0 + 0.1 * 0.0)  # EMA, lambda = 0.9
    assert p.top(0, 1) == [(3,)]
    assert pools.decayed(0.0) == 1.0 and pools.decayed(1.0) == pytest.approx(0.01)


def test_searches_sharing_a_memo_score_each_subnet_once(monkeypatch):
    """A build searches once per round and option with one supernet and one dataset: given the same memo, a second
    search recalibrates and scores nothing again and picks what the first picked."""
    from edgeprune.pipeline import SUPERNET
    from edgeprune.search import evaluate, select
    from edgeprune.search.train import load

    supernet, ckpt = load(SUPERNET)
    calls = {"score": 0, "taylor": 0}

    def score(net, arch, ds):
        calls["score"] += 1
        return (space.macs(arch) % 997) / 997  # any fixed function of the subnet

    def taylor(net, arch, ds):
        calls["taylor"] += 1
        return {it.name: np.ones(max(it.options)) for it in knapsack.items_of(knapsack.widest(arch))}

    monkeypatch.setattr(evaluate, "score", score)
    monkeypatch.setattr(knapsack, "taylor_importance", taylor)
    resolutions = tuple(ckpt["space"]["resolutions"])

    def latency(a):
        return space.macs(a) / 1e6

    memo: dict = {}
    budget = latency(space.Space(resolutions=resolutions).largest(max(resolutions))) / 2
    first, _ = select.search(supernet, ckpt, None, latency, budget, resolutions, memo=memo)
    counted = dict(calls)
    assert counted["score"] > 1 and counted["taylor"] >= 1
    second, _ = select.search(supernet, ckpt, None, latency, budget, resolutions, memo=memo)
    assert calls == counted and second.arch == first.arch and second.val_accuracy == first.val_accuracy
    select.search(supernet, ckpt, None, latency, budget, resolutions)  # no memo: scored again
    assert calls["score"] == 2 * counted["score"]


def test_an_aim_below_every_subnet_gives_the_smallest_when_it_is_priced_within_the_limit(monkeypatch):
    """A build loop lowers its aim after measured misses. When the aim falls below the smallest subnet while the
    model still prices that subnet within the user's budget (`limit_ms`), the search answers with the smallest, to
    be measured, instead of giving up; priced over the limit, it gives up naming the smallest's price."""
    from edgeprune.pipeline import SUPERNET
    from edgeprune.search import evaluate, select
    from edgeprune.search.train import load

    supernet, ckpt = load(SUPERNET)
    monkeypatch.setattr(evaluate, "score", lambda net, arch, ds: (space.macs(arch) % 997) / 997)
    monkeypatch.setattr(knapsack, "taylor_importance", lambda net, arch, ds: {
        it.name: np.ones(max(it.options)) for it in knapsack.items_of(knapsack.widest(arch))})
    resolutions = tuple(ckpt["space"]["resolutions"])
    smallest = space.Space(resolutions=resolutions).smallest(min(resolutions))

    def latency(a):
        return space.macs(a) / 1e6

    aim = latency(smallest) * 0.8
    with pytest.raises(select.BudgetError) as e:
        select.search(supernet, ckpt, None, latency, aim, resolutions)
    assert e.value.smallest_ms == pytest.approx(latency(smallest))
    found, _ = select.search(supernet, ckpt, None, latency, aim, resolutions, limit_ms=latency(smallest) * 1.2)
    assert found.arch == smallest and found.origin == "smallest"
    with pytest.raises(select.BudgetError):
        select.search(supernet, ckpt, None, latency, aim, resolutions, limit_ms=latency(smallest) * 0.9)
