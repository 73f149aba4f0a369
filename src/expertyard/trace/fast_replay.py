"""The replay loop of `trace.simulate` compiled with numba, for the policies that have a kernel here (lru, lfu,
layer-distance, reuse, reuse-hint, belady) and replays without prefetch: the same hits and misses as the Python classes in
`experts.policies` driving `ExpertCacheState`, decision by decision (tests/test_fast_replay.py compares them),
at 20-100x the speed.

`lookahead` W with reuse or reuse-hint (an analysis oracle, not a policy of the engine;
`benchmarks/lookahead_bound.py`): a candidate whose next use is known to fall within the next W visits is ranked
by that visit, as Belady ranks it, below every candidate whose next use lies beyond (those keep the policy's own
order). W = 0 is the policy itself; an unbounded W misses exactly what Belady misses.

Keys are dense ids `layer * E + expert` (so their order is the (layer, expert) tuple order). Each policy's
state lives in arrays indexed by key; the resident experts are scanned slot by slot for a victim, with the
same tie-breaks as the Python classes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from expertyard.experts.policies.reuse import MAX_AGE, UNKNOWN

# V = visits, P = (visit, expert) occurrences, N = L x E keys, C = cache slots

KERNELS = {"lru": 0, "lfu": 1, "layer-distance": 2, "reuse": 3, "belady": 4, "reuse-hint": 5}
NEVER = 1 << 62
HIT, FREE = -2, -1  # replay log entries besides an evicted key


def next_uses(offsets: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each occurrence of a key (keys [P], visit v = the row of `offsets`), the next visit using it (NEVER:
    none). int64 [P]."""
    visit = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # [P]
    order = np.lexsort((visit, keys))  # by key, then visit
    nxt = np.full(len(keys), NEVER, np.int64)
    same = keys[order][1:] == keys[order][:-1]
    nxt[order[:-1][same]] = visit[order][1:][same]
    return nxt


@njit(cache=True)
def _expected_wait(hist, sums, m):
    s = 0
    w = 0
    for a in range(MAX_AGE, -1, -1):
        s += sums[a]
        w += hist[a]
        m[a] = s / w - a if w > 0 else UNKNOWN


@njit(cache=True)
def _victim(kind, n_res, sl_key, sl_stamp, gid, E, last, count, rank_t, ins, nxt_key, seen_n, cur, sweep,
            touch_s, m, hint_sum, latest_n, v, look):
    """The slot to evict (-1: every resident expert is protected); `look` >= 0: the lookahead of visit v."""
    best = -1
    b1 = 0.0
    b2 = 0
    b3 = 0
    for i in range(n_res):
        if sl_stamp[i] == gid:
            continue
        k = sl_key[i]
        if look >= 0 and nxt_key[k] - v <= look:  # next use known: Belady's order, below every other candidate
            v1 = float(nxt_key[k] - v - look - 1)  # < 0 <= reuse's and reuse-hint's estimates
            v2 = -ins[k]
            v3 = 0
        elif kind == 0:  # lru: min (last use, key)
            v1 = -float(last[k])
            v2 = 0
            v3 = -k
        elif kind == 1:  # lfu: min (count, last use, key)
            v1 = -float(count[k])
            v2 = -rank_t[k]
            v3 = -k
        elif kind == 2:  # layer-distance: max (distance, -last use, key)
            d = k // E - cur - 1
            if d < 0:
                d += seen_n
            v1 = float(d)
            v2 = -last[k]
            v3 = k
        elif kind == 3 or kind == 5:  # reuse, reuse-hint: max (estimate, -last touch, -key)
            p = k // E
            d = p - cur - 1
            if d < 0:
                d += seen_n
            a = sweep - touch_s[k] + (1 if p <= cur else 0)
            if kind == 5 and latest_n[p] > 0:  # the hint p(k) replaces reuse's h(a)
                hint = hint_sum[p, k - p * E] / latest_n[p]
                v1 = d + seen_n * (1.0 - hint) * (1.0 + m[min(a + 1, MAX_AGE)])
            else:
                v1 = d + seen_n * m[min(a, MAX_AGE)]
            v2 = -last[k]
            v3 = -k
        else:  # belady: max next use, then the oldest insertion (the Python dict's order)
            v1 = float(nxt_key[k])
            v2 = -ins[k]
            v3 = 0
        if best < 0 or v1 > b1 or (v1 == b1 and (v2 > b2 or (v2 == b2 and v3 > b3))):
            best = i
            b1 = v1
            b2 = v2
            b3 = v3
    return best


@njit(cache=True)
def _learn_hint(k, layer, E, sweep, uses, follow, prev_e, prev_n, latest_e, latest_n, latest_sweep, in_latest,
                hint_sum):
    """reuse-hint's `on_access`: the next-sweep table and the layer's hint sums, as `ReuseHintPolicy` keeps them."""
    if latest_sweep[layer] != sweep:  # the first access of this layer in this sweep
        prev_n[layer] = latest_n[layer]
        prev_e[layer, :] = latest_e[layer, :]
        latest_n[layer] = 0
        latest_sweep[layer] = sweep
        hint_sum[layer, :] = 0.0
    if in_latest[k] == sweep:
        return
    in_latest[k] = sweep
    e = k - layer * E
    for i in range(prev_n[layer]):
        follow[layer * E + prev_e[layer, i], e] += 1
    uses[k] += 1
    latest_e[layer, latest_n[layer]] = e
    latest_n[layer] += 1
    for e2 in range(E):
        c = follow[k, e2]
        if c > 0:
            hint_sum[layer, e2] += c / uses[k]


@njit(cache=True)
def replay(kind, offsets, keys, layers, pairs, nxt, capacity, top_k, num_keys, E, log, look=-1):
    """Replay visits (visit v uses keys[offsets[v]:offsets[v+1]] of MoE layer layers[v], from `pairs`
    (token, expert) pairs) through a cache of `capacity` slots. Returns (hits, misses, releases); log [P] gets,
    per access, HIT, FREE (a miss loaded into a free slot) or the key the miss evicted. `look` >= 0: the
    lookahead W (next uses from `nxt`; -1: none)."""
    V = len(offsets) - 1
    slot_of = np.full(num_keys, -1, np.int64)
    sl_key = np.empty(capacity, np.int64)
    sl_stamp = np.full(capacity, -1, np.int64)
    n_res = 0
    last = np.zeros(num_keys, np.int64)  # now of the latest use or load (lru, layer-distance, reuse ties)
    count = np.zeros(num_keys, np.int64)  # lfu: count in the rank (uses so far at the last touch)
    uses = np.zeros(num_keys, np.int64)  # lfu: uses over the run
    rank_t = np.zeros(num_keys, np.int64)
    ins = np.zeros(num_keys, np.int64)  # belady: insertion order
    nxt_key = np.zeros(num_keys, np.int64)
    last_use_s = np.full(num_keys, -1, np.int64)  # reuse: sweep of the latest use
    touch_s = np.zeros(num_keys, np.int64)  # reuse: sweep of the latest use or load
    hist = np.zeros(MAX_AGE + 1, np.int64)
    sums = np.zeros(MAX_AGE + 1, np.int64)
    m = np.empty(MAX_AGE + 1, np.float64)
    _expected_wait(hist, sums, m)
    L = num_keys // E
    hinted = kind == 5
    uses_h = np.zeros(num_keys if hinted else 0, np.int64)  # reuse-hint: sweeps that used the key
    follow = np.zeros((num_keys, E) if hinted else (0, E), np.int64)  # key (layer, s) -> [E] next sweep's uses
    prev_e = np.zeros((L, E), np.int64)  # per layer: the experts of the sweep before the latest
    prev_n = np.zeros(L, np.int64)
    latest_e = np.zeros((L, E), np.int64)  # per layer: the experts of the latest sweep (so far)
    latest_n = np.zeros(L, np.int64)
    latest_sweep = np.full(L, -1, np.int64)
    in_latest = np.full(num_keys if hinted else 0, -1, np.int64)  # sweep in which the key joined `latest`
    hint_sum = np.zeros((L, E), np.float64)  # per layer: sum over latest s of follow[s] / uses[s]
    seen_n = 0
    cur = -1
    cur_visit = -1
    sweep = 0
    seq = 0
    gid = 0
    hits = 0
    misses = 0
    releases = 0
    for v in range(V):
        lo = offsets[v]
        hi = offsets[v + 1]
        layer = layers[v]
        nk = hi - lo
        room = nk
        if pairs[v] > capacity:
            if nk > capacity:
                releases += 1
            room = max(top_k, capacity)
        for g0 in range(lo, hi, room):
            g1 = min(hi, g0 + room)
            gid += 1
            # on_visit
            if not (v == cur_visit and layer == cur):
                if cur_visit >= 0 and layer <= cur:
                    sweep += 1
                    if kind == 3 or kind == 5:
                        _expected_wait(hist, sums, m)
                if layer + 1 > seen_n:
                    seen_n = layer + 1
                cur = layer
                cur_visit = v
            for j in range(g0, g1):
                s = slot_of[keys[j]]
                if s >= 0:
                    sl_stamp[s] = gid
            for j in range(g0, g1):
                k = keys[j]
                if slot_of[k] >= 0:
                    hits += 1
                    log[j] = HIT
                else:
                    misses += 1
                    if n_res < capacity:
                        s = n_res
                        n_res += 1
                        log[j] = FREE
                    else:
                        s = _victim(kind, n_res, sl_key, sl_stamp, gid, E, last, count, rank_t, ins, nxt_key,
                                    seen_n, cur, sweep, touch_s, m, hint_sum, latest_n, v, look)
                        if s < 0:
                            return hits, misses, -1  # cannot hold the visit's experts
                        log[j] = sl_key[s]
                        slot_of[sl_key[s]] = -1
                    sl_key[s] = k
                    sl_stamp[s] = gid
                    slot_of[k] = s
                    # on_insert
                    last[k] = v
                    count[k] = uses[k]
                    rank_t[k] = v
                    seq += 1
                    ins[k] = seq
                    touch_s[k] = sweep
                # on_access
                last[k] = v
                uses[k] += 1
                count[k] = uses[k]
                rank_t[k] = v
                nxt_key[k] = nxt[j]
                if kind == 3 or kind == 5:
                    lu = last_use_s[k]
                    if lu >= 0 and lu < sweep:
                        r = sweep - lu
                        b = min(r, MAX_AGE)
                        hist[b] += 1
                        sums[b] += r
                    last_use_s[k] = sweep
                    touch_s[k] = sweep
                if hinted:
                    _learn_hint(k, layer, E, sweep, uses_h, follow, prev_e, prev_n, latest_e, latest_n, latest_sweep,
                                in_latest, hint_sum)
    return hits, misses, releases


def visit_arrays(trace, batch_size: int, schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The visits of `trace.simulate.visits` (no prediction) as arrays: offsets [V+1], keys [P] (layer * E +
    expert, each visit's union in first-seen order), layers [V], pairs [V] (tokens x top_k)."""
    t, L, K = trace.experts.shape
    E = trace.num_experts
    ex = trace.experts.astype(np.int64)  # [T, L, K]
    if batch_size == 1 and (np.diff(np.sort(ex, axis=2), axis=2) != 0).all():
        keys = (np.arange(L)[None, :, None] * E + ex).reshape(-1)  # [T*L*K]
        offsets = np.arange(t * L + 1, dtype=np.int64) * K
        layers = np.tile(np.arange(L, dtype=np.int64), t)
        return offsets, keys, layers, np.full(t * L, K, np.int64)
    rows, layers, pairs, offsets = [], [], [], [0]
    lists = ex.tolist()
    for tokens in schedule(trace, batch_size):
        for li in range(L):
            union = list(dict.fromkeys(e for tok in tokens for e in lists[tok][li]))
            rows.extend(li * E + e for e in union)
            offsets.append(len(rows))
            layers.append(li)
            pairs.append(len(tokens) * K)
    return (np.asarray(offsets, np.int64), np.asarray(rows, np.int64), np.asarray(layers, np.int64),
            np.asarray(pairs, np.int64))


def fast_replay(trace, policy: str, capacity: int, batch_size: int, schedule, log: bool = False,
                lookahead: float | None = None):
    """(hits, misses, releases, visits) of replaying `trace` with `policy` (a key of KERNELS); with `log`, also
    (offsets, keys, per-access log) to compare decision by decision. `lookahead` W (visits; math.inf: all): the
    oracle of the module docstring (a use later in the visit being loaded, when it is split in groups, counts
    as known at W = 0)."""
    assert lookahead is None or policy in ("reuse", "reuse-hint"), "a lookahead ranks below estimates >= 0"
    offsets, keys, layers, pairs = visit_arrays(trace, batch_size, schedule)
    known = policy == "belady" or lookahead is not None
    nxt = next_uses(offsets, keys) if known else np.zeros(len(keys), np.int64)
    look = -1 if lookahead is None else int(min(lookahead, len(offsets)))  # >= V: every next use that exists
    out = np.empty(len(keys), np.int64)  # [P]
    hits, misses, releases = replay(KERNELS[policy], offsets, keys, layers, pairs, nxt, capacity, trace.top_k,
                                    trace.num_layers * trace.num_experts, trace.num_experts, out, look)
    assert releases >= 0, "a visit's group of at most `capacity` experts always fits"
    counts = (int(hits), int(misses), int(releases), len(offsets) - 1)
    return (counts, (offsets, keys, out)) if log else counts
