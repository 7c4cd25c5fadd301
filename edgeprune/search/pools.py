"""PSS-Net prioritized subnet pools (Chen et al., TPAMI 2023), bucketed by latency on a target.

One pool per latency bucket. A conditional sampler draws a subnet for a given bucket: genes from per-bucket
marginals estimated on a prior map of random subnets, rejected until the latency falls in the bucket. While training,
a bucket's subnet comes from the sampler with probability p_e (or while the pool is not full), otherwise from its
pool with probability softmax(score / tau_e); scores are -loss on the current batch, smoothed by an EMA, and the
lowest-scoring entry is evicted from a full pool. p_e and tau_e decay geometrically from 1 to 0.01.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .space import Arch, Space

POOL_SIZE = 50
LAMBDA = 0.9  # EMA weight of the old score
DECAY = (1.0, 0.01)  # p_e and tau_e go from the first to the second, geometrically


def decayed(progress: float, start: float = DECAY[0], end: float = DECAY[1]) -> float:
    return start * (end / start) ** min(max(progress, 0.0), 1.0)


def bucket_edges(low_ms: float, high_ms: float, count: int) -> np.ndarray:
    """count buckets, equal in log latency, covering [low, high]."""
    return np.geomspace(low_ms, high_ms, count + 1)


@dataclass
class Pools:
    space: Space
    edges: np.ndarray
    latency: Callable[[Arch], float]
    size: int = POOL_SIZE
    pools: list[dict[tuple, float]] = field(default_factory=list)  # per bucket: genes -> score
    marginals: list[list[np.ndarray]] = field(default_factory=list)  # per bucket, per gene: probabilities

    def __post_init__(self):
        if not self.pools:
            self.pools = [{} for _ in range(len(self.edges) - 1)]

    def bucket(self, ms: float) -> int | None:
        i = int(np.searchsorted(self.edges, ms, side="right")) - 1
        return i if 0 <= i < len(self.pools) else None

    def build_prior(self, rng: np.random.Generator, draws: int = 4000) -> None:
        """Per-bucket categorical marginals of every gene, from uniformly drawn subnets (PSS-Net's prior map)."""
        choices = self.space.gene_choices()
        counts = [[np.ones(len(c)) * 0.1 for c in choices] for _ in self.pools]  # smoothed: no choice impossible
        for _ in range(draws):
            genes = self.space.sample_genes(rng)
            b = self.bucket(self.latency(self.space.decode(genes)))
            if b is not None:
                for g, v in enumerate(genes):
                    counts[b][g][v] += 1
        self.marginals = [[c / c.sum() for c in per] for per in counts]

    def draw(self, bucket: int, rng: np.random.Generator, tries: int = 200) -> tuple:
        """A fresh subnet whose latency falls in `bucket` (the nearest found, if none in `tries`)."""
        best, best_gap = None, np.inf
        center = np.sqrt(self.edges[bucket] * self.edges[bucket + 1])
        for _ in range(tries):
            genes = tuple(int(rng.choice(len(p), p=p)) for p in self.marginals[bucket])
            ms = self.latency(self.space.decode(genes))
            if self.bucket(ms) == bucket:
                return genes
            gap = abs(np.log(ms / center))
            if gap < best_gap:
                best, best_gap = genes, gap
        return best

    def choose(self, bucket: int, progress: float, rng: np.random.Generator) -> tuple:
        pool = self.pools[bucket]
        if len(pool) < self.size or rng.random() < decayed(progress):
            return self.draw(bucket, rng)
        keys = list(pool)
        scores = np.array([pool[k] for k in keys]) / decayed(progress)
        p = np.exp(scores - scores.max())
        return keys[int(rng.choice(len(keys), p=p / p.sum()))]

    def update(self, bucket: int, genes: tuple, score: float) -> None:
        pool = self.pools[bucket]
        pool[genes] = LAMBDA * pool[genes] + (1 - LAMBDA) * score if genes in pool else score
        if len(pool) > self.size:
            del pool[min(pool, key=pool.get)]

    def top(self, bucket: int, k: int) -> list[tuple]:
        pool = self.pools[bucket]
        return sorted(pool, key=pool.get, reverse=True)[:k]

    def state(self) -> dict:
        """Pools and marginals as plain lists (a checkpoint loads them with torch.load(weights_only=True)); the
        order of each pool is kept, since sampling from a pool and eviction depend on it."""
        return {"pools": [[[list(g), float(v)] for g, v in pool.items()] for pool in self.pools],
                "marginals": [[m.tolist() for m in per] for per in self.marginals]}

    def load_state(self, state: dict) -> None:
        self.pools = [{tuple(int(v) for v in g): float(s) for g, s in pool} for pool in state["pools"]]
        self.marginals = [[np.array(m, dtype=np.float64) for m in per] for per in state["marginals"]]
