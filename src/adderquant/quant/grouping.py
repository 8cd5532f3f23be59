"""Clustering output channels into groups that share one quantization scale (paper Sec. 3.1).

For the 1-D features (max|W_c| — the paper's choice — and mean|W_c|) the optimal partition for
Eq. 15 is found exactly by dynamic programming over the sorted values (optimal 1-D k-means): in
one dimension an optimal cluster is always a contiguous run of the sorted values. That is
deterministic and provably optimal, unlike randomly initialised k-means. The ``all`` feature
(every weight of the channel) is clustered with seeded k-means++ / Lloyd.

:func:`error_groups` groups by what the channels need instead of what their weights look like: the
range search's ``range_search_scope="regroup"`` hands it each channel's output error under every
candidate activation range.
"""

from __future__ import annotations

import itertools

import torch


def channel_features(weight: torch.Tensor, feature: str) -> torch.Tensor:
    """Per-output-channel feature: ``max`` |W_c| (Eq. 14), ``mean`` |W_c|, or ``all`` (flattened W_c)."""
    flat = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if feature == "max":
        return flat.abs().amax(1)
    if feature == "mean":
        return flat.abs().mean(1)
    if feature == "all":
        return flat
    raise ValueError(f"no channel feature {feature!r}")


def optimal_1d_clusters(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Labels (0..g'-1, ordered by value) minimising Σ_j Σ_{c∈I_j} (f_c − μ_j)² exactly.

    O(g·n²) dynamic programming on prefix sums; n = output channels (≤ a few thousand). When there
    are fewer distinct values than groups, the number of groups shrinks to the distinct count.
    """
    v = values.detach().to(torch.float64).flatten()
    n = v.numel()
    g = min(groups, int(torch.unique(v).numel()))
    order = torch.argsort(v, stable=True)
    s = v[order]
    p1 = torch.cat([s.new_zeros(1), s.cumsum(0)])
    p2 = torch.cat([s.new_zeros(1), (s * s).cumsum(0)])

    def sse(i, j):  # cost of s[i:j] as one cluster; broadcasts over tensors
        cnt = (j - i).to(torch.float64)
        tot = p1[j] - p1[i]
        return (p2[j] - p2[i]) - tot * tot / cnt

    inf = torch.tensor(float("inf"), dtype=torch.float64)
    cost = torch.full((g + 1, n + 1), float("inf"), dtype=torch.float64)
    back = torch.zeros((g + 1, n + 1), dtype=torch.long)
    cost[0, 0] = 0.0
    idx = torch.arange(n + 1)
    for k in range(1, g + 1):
        for j in range(k, n + 1):
            i = idx[k - 1 : j]  # last cluster is s[i:j], non-empty
            c = cost[k - 1, i] + sse(i, torch.full_like(i, j))
            c = torch.where(torch.isfinite(cost[k - 1, i]), c, inf)
            best = int(torch.argmin(c))
            cost[k, j], back[k, j] = c[best], i[best]
    labels_sorted = torch.empty(n, dtype=torch.long)
    j = n
    for k in range(g, 0, -1):
        i = int(back[k, j])
        labels_sorted[i:j] = k - 1
        j = i
    labels = torch.empty(n, dtype=torch.long)
    labels[order] = labels_sorted
    return labels


def kmeans_clusters(points: torch.Tensor, groups: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Seeded k-means++ then Lloyd iterations; labels ordered by each cluster's mean max-abs value."""
    x = points.detach().to(torch.float64)
    n = x.shape[0]
    g = min(groups, n)
    gen = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    for _ in range(1, g):
        d2 = torch.cdist(x, torch.stack(centers)).amin(1) ** 2
        if float(d2.sum()) == 0.0:
            break
        centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)].squeeze(0))
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        c = torch.stack([x[labels == k].mean(0) if (labels == k).any() else c[k] for k in range(c.shape[0])])
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return _relabel_by(labels, x.abs().amax(1))


def _relabel_by(labels: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Renumber groups 0..g'-1 by ascending mean ``key`` and drop empty groups."""
    present = torch.unique(labels)
    means = torch.stack([key[labels == k].mean() for k in present])
    rank = {int(present[i]): r for r, i in enumerate(torch.argsort(means).tolist())}
    return torch.tensor([rank[int(v)] for v in labels], dtype=torch.long)


def group_channels(weight: torch.Tensor, groups: int, feature: str = "max", seed: int = 0) -> torch.Tensor:
    """Group label per output channel for ``groups`` groups using ``feature`` (see module docstring)."""
    n = weight.shape[0]
    if groups <= 1 or n == 1:
        return torch.zeros(n, dtype=torch.long)
    if feature == "uniform":  # equal split in channel order, no clustering (the paper's "Uniform")
        return torch.div(torch.arange(n) * min(groups, n), n, rounding_mode="floor")
    f = channel_features(weight, feature)
    if feature == "all":
        return kmeans_clusters(f, groups, seed=seed)
    return optimal_1d_clusters(f, groups)


def clustering_cost(values: torch.Tensor, labels: torch.Tensor) -> float:
    """Eq. 15: Σ_j Σ_{c∈I_j} |f_c − μ_j|²."""
    v = values.to(torch.float64)
    return float(sum(((v[labels == k] - v[labels == k].mean()) ** 2).sum() for k in torch.unique(labels)))


def per_group_errors(errors: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
    """``errors`` (candidates × channels) summed over each group's channels: candidates × groups."""
    out = torch.zeros(errors.shape[0], int(group_of.max()) + 1, dtype=errors.dtype, device=errors.device)
    return out.index_add_(1, group_of, errors)


def error_groups(errors: torch.Tensor, groups: int) -> tuple[list[int], torch.Tensor]:
    """Channels grouped by the range that serves them best. ``errors[a, c]`` is output channel c's
    error under candidate range a; of the at most ``groups`` candidates whose per-channel minimum sums
    lowest — every subset tried, so exact for the candidates given — each channel takes its best.
    Returns the candidates in use (ascending index, one per group) and the labels 0..g'-1 (a candidate
    no channel picks is dropped). Ties go to the earlier subset and the earlier candidate."""
    e = errors.detach().to(torch.float64)
    k = min(groups, e.shape[0])
    subset = min(itertools.combinations(range(e.shape[0]), k), key=lambda s: float(e[list(s)].amin(0).sum()))
    pick = [subset[i] for i in e[list(subset)].argmin(0).tolist()]
    used = sorted(set(pick))
    return used, torch.tensor([used.index(a) for a in pick], dtype=torch.long)
