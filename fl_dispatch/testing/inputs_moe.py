"""Input cases of the MoE and MLA ops (the conformance kit's, used by verify, bench and tests).

Outputs the op writes are pre-filled with garbage (-7), so an impl that leaves one unwritten
fails. Routing cases inject ties at the top-k boundary (the lower expert index must win);
alignment cases include experts with no token, one expert taking everything, and an
``expert_map`` with non-local experts; its ``canonical`` sorts each block's token ids (the
order inside an expert's blocks is unspecified) and zeroes ``experts_ids`` past the used
blocks (vLLM leaves those unwritten).
"""

from __future__ import annotations

from typing import Any

import torch

from .inputs import DTYPES, Case, Size, _seed, _size

_GARBAGE = -7


def _gen(*parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(*parts))
    return g


# --------------------------------------------------------------------------- routing
def topk_softmax_case(tokens: int, experts: int, k: int, dtype: str, *, renormalize: bool,
                      bias: bool = False, ties: bool = False, ids_dtype: str = "int32") -> Case:
    """``topk_softmax`` on random ``[T, E]`` logits; ``ties``: the k-th and (k+1)-th best of
    every row are made equal (and a few rows are all equal)."""
    name = (f"T={tokens} E={experts} k={k} renorm={renormalize}" + (" bias" if bias else "")
            + (" ties" if ties else "") + f" ids:{ids_dtype}")

    def build(device: torch.device) -> dict[str, Any]:
        g = _gen("topk_softmax", name, dtype)
        logits = torch.randn(tokens, experts, generator=g)
        if ties:
            top = logits.sort(dim=1, descending=True).values
            kth = top[:, k - 1:k]
            # the best k+1 entries take the k-th value: whoever is lower-indexed must win
            idx = logits.argsort(dim=1, descending=True)[:, :k + 1]
            logits.scatter_(1, idx[:, k - 1:], kth.expand(-1, idx.shape[1] - k + 1))
            logits[::3] = 0.5
        e_bias = (torch.randn(experts, generator=g) * 0.1).to(device) if bias else None
        ids_t = torch.int32 if ids_dtype == "int32" else torch.int64
        return {
            "topk_weights": torch.full((tokens, k), _GARBAGE, dtype=torch.float32,
                                       device=device),
            "topk_ids": torch.full((tokens, k), _GARBAGE, dtype=ids_t, device=device),
            "token_expert_indices": torch.full((tokens, k), _GARBAGE, dtype=torch.int32,
                                               device=device),
            "gating_output": logits.to(device=device, dtype=DTYPES[dtype]),
            "renormalize": renormalize,
            "e_score_correction_bias": e_bias,
        }

    return Case("topk_softmax", name, dtype, build, "none",
                tokens * experts * _size(dtype) + tokens * k * 12)


def grouped_topk_case(tokens: int, experts: int, groups: int, keep: int, k: int, dtype: str,
                      *, scoring_func: int = 1, renormalize: bool = True,
                      scale: float = 2.5, bias: bool = True, ties: bool = False,
                      neg_inf_row: bool = False) -> Case:
    """DeepSeek-V3's routing (``grouped_topk``); ``neg_inf_row``: one row of all ``-inf``."""
    name = (f"T={tokens} E={experts} groups={groups}/{keep} k={k} "
            f"{'sigmoid' if scoring_func else 'identity'} renorm={renormalize} scale={scale}"
            + (" bias" if bias else "") + (" ties" if ties else "")
            + (" -inf-row" if neg_inf_row else ""))

    def build(device: torch.device) -> dict[str, Any]:
        g = _gen("grouped_topk", name, dtype)
        scores = torch.randn(tokens, experts, generator=g)
        if ties:
            scores[:, 1::4] = scores[:, 0::4]
        if neg_inf_row:
            scores[0] = float("-inf")
        b = (torch.randn(experts, generator=g) * 0.1) if bias else None
        return {"scores": scores.to(device=device, dtype=DTYPES[dtype]),
                "num_expert_group": groups, "topk_group": keep, "topk": k,
                "renormalize": renormalize, "routed_scaling_factor": scale,
                "bias": b.to(device=device, dtype=DTYPES[dtype]) if b is not None else None,
                "scoring_func": scoring_func}

    return Case("grouped_topk", name, dtype, build, "new",
                tokens * experts * _size(dtype) + tokens * k * 8)


# --------------------------------------------------------------------------- alignment
def _padded(numel: int, experts: int, block: int) -> int:
    size = numel + experts * (block - 1)
    return min(numel * block, size) if numel < experts else size


def align_canonical(args: dict[str, Any]) -> None:
    """Zero ``experts_ids`` past the used blocks (never read; vLLM leaves them unwritten) and
    sort ``sorted_token_ids`` inside each expert's segment (the run of blocks of one expert):
    the order of an expert's tokens is unspecified, and with more tokens than a block they
    may sit in any of its blocks (vLLM's atomic kernel), so only the segment's multiset is
    fixed. Slots past the used blocks must hold the pad value and are left as they are."""
    bs = args["block_size"]
    ids = args["sorted_token_ids"]
    experts = args["experts_ids"]
    used = args["num_tokens_post_pad"].reshape(-1)[:1].long() // bs
    blocks = torch.arange(experts.numel(), device=ids.device)
    experts.masked_fill_(blocks >= used, 0)
    n = min(ids.numel() // bs, experts.numel()) * bs
    if n == 0:
        return
    change = torch.ones(n // bs, dtype=torch.long, device=ids.device)
    change[1:] = (experts[1:n // bs] != experts[:n // bs - 1]).long()
    segment = (change.cumsum(0) - 1).repeat_interleave(bs)
    key = segment * (2**33) + ids[:n].long()
    ids[:n].copy_(ids[:n][key.argsort()])


def align_mismatch(got: tuple, want: tuple, block_size: int) -> str | None:
    """None when two ``moe_align_block_size`` results ``(sorted_token_ids, experts_ids,
    num_tokens_post_pad)`` agree as far as the contract fixes them (``num_tokens_post_pad``,
    the used blocks' experts, each expert segment's tokens as a multiset: ``align_canonical``
    on copies); else what differs. The slots past the used blocks are not compared."""
    if not torch.equal(got[2], want[2]):
        return f"num_tokens_post_pad {got[2].item()} vs {want[2].item()}"
    used = int(want[2].item()) // block_size
    if not torch.equal(got[1][:used], want[1][:used]):
        return "experts_ids differ"
    canon = []
    for b in (got, want):
        a = {"block_size": block_size, "sorted_token_ids": b[0].clone(),
             "experts_ids": b[1].clone(), "num_tokens_post_pad": b[2]}
        align_canonical(a)
        canon.append(a["sorted_token_ids"][:used * block_size])
    if not torch.equal(canon[0], canon[1]):
        return "per-expert token sets differ"
    return None


def align_case(tokens: int, experts: int, k: int, block: int, *, routing: str = "random",
               expert_map: bool = False, ids_dtype: str = "int32") -> Case:
    """``moe_align_block_size``; ``routing``: random, one (every route on expert 1), sparse
    (only a quarter of the experts get tokens). ``expert_map``: the odd experts are on
    another rank (-1), the even ones local in reverse order."""
    name = (f"T={tokens} E={experts} k={k} bs={block} routing={routing}"
            + (" expert_map" if expert_map else "") + f" ids:{ids_dtype}")
    numel = tokens * k
    padded = _padded(numel, experts, block)

    def build(device: torch.device) -> dict[str, Any]:
        g = _gen("moe_align_block_size", name)
        if routing == "one":
            ids = torch.full((tokens, k), 1 % experts, dtype=torch.int64)
        else:
            pool = experts if routing == "random" else max(1, experts // 4)
            ids = torch.rand(tokens, pool, generator=g).argsort(dim=1)[:, :min(k, pool)]
            if ids.shape[1] < k:
                ids = torch.cat([ids] * k, dim=1)[:, :k]
        emap = None
        if expert_map:
            local = torch.arange(experts)
            emap = torch.where(local % 2 == 0, (experts - 1 - local) // 2,
                               torch.full_like(local, -1)).to(torch.int32).to(device)
        ids_t = torch.int32 if ids_dtype == "int32" else torch.int64
        return {"topk_ids": ids.to(device=device, dtype=ids_t), "num_experts": experts,
                "block_size": block,
                "sorted_token_ids": torch.full((padded,), _GARBAGE, dtype=torch.int32,
                                               device=device),
                "experts_ids": torch.full((-(-padded // block),), _GARBAGE,
                                          dtype=torch.int32, device=device),
                "num_tokens_post_pad": torch.full((1,), _GARBAGE, dtype=torch.int32,
                                                  device=device),
                "expert_map": emap}

    return Case("moe_align_block_size", name, "int32", build, "none",
                numel * 4 + padded * 4, canonical=align_canonical)


def moe_sum_case(tokens: int, k: int, hidden: int, dtype: str) -> Case:
    """``moe_sum``: ``[T, k, H]`` -> ``[T, H]`` (output pre-filled with garbage)."""
    name = f"T={tokens} k={k} H={hidden}"

    def build(device: torch.device) -> dict[str, Any]:
        g = _gen("moe_sum", name, dtype)
        x = torch.randn(tokens, k, hidden, generator=g).to(device=device, dtype=DTYPES[dtype])
        out = torch.full((tokens, hidden), _GARBAGE, device=device, dtype=DTYPES[dtype])
        return {"input": x, "output": out}

    return Case("moe_sum", name, dtype, build, "none",
                tokens * (k + 1) * hidden * _size(dtype))


# --------------------------------------------------------------------------- experts
def experts_case(tokens: int, experts: int, k: int, hidden: int, inter: int, dtype: str, *,
                 activation: str = "silu", on_input: bool = False, expert_map: bool = False,
                 global_experts: int | None = None, routing: str = "random") -> Case:
    """``fused_experts`` with weights scaled so outputs are of magnitude ~1.
    ``expert_map``: ``global_experts`` (default 2E) global ids, E of them local (every other
    one), the rest on other ranks; ``global_experts`` without a map: ids up to that bound
    (those >= E contribute nothing). ``routing``: random, or "one" (all on expert 0)."""
    ge = global_experts or (2 * experts if expert_map else experts)
    name = (f"T={tokens} E={experts} k={k} K={hidden} N={inter} {activation}"
            + (" on_input" if on_input else "") + (" expert_map" if expert_map else "")
            + (f" global={ge}" if ge != experts else "") + f" routing={routing}")

    def build(device: torch.device) -> dict[str, Any]:
        g = _gen("fused_experts", name, dtype)
        dt = DTYPES[dtype]
        x = torch.randn(tokens, hidden, generator=g)
        w1 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
        w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
        if routing == "one":
            ids = torch.zeros(tokens, k, dtype=torch.int64)
            ids[:, 1:] = torch.arange(1, k) % ge
        else:
            ids = torch.rand(tokens, ge, generator=g).argsort(dim=1)[:, :k]
        weights = torch.rand(tokens, k, generator=g) + 0.5
        emap = None
        if expert_map:
            glob = torch.arange(ge)
            emap = torch.where((glob % 2 == 0) & (glob // 2 < experts), glob // 2,
                               torch.full_like(glob, -1)).to(torch.int32).to(device)
        return {"hidden_states": x.to(device=device, dtype=dt),
                "w1": w1.to(device=device, dtype=dt), "w2": w2.to(device=device, dtype=dt),
                "topk_weights": weights.to(device), "topk_ids": ids.to(torch.int32).to(device),
                "activation": activation, "apply_router_weight_on_input": on_input,
                "global_num_experts": ge if (expert_map or ge != experts) else -1,
                "expert_map": emap}

    hit = min(experts, tokens * k)
    weight_bytes = hit * 3 * inter * hidden * _size(dtype)
    return Case("fused_experts", name, dtype, build, "new",
                weight_bytes + 2 * tokens * hidden * _size(dtype),
                flops=2 * tokens * k * 3 * inter * hidden)


# --------------------------------------------------------------------------- MLA
def mla_case(batch: int, s_q: int, heads: int, mean_len: int, dtype: str, *,
             d: int = 576, dv: int = 512, block: int = 64, causal: bool = True,
             zero_row: bool = True, scale: float | None = None) -> Case:
    """``flash_mla`` over a paged cache with shuffled block tables; row lengths vary around
    ``mean_len`` (FlashMLA's benchmark: normal, sd mean/2), with one zero-length row."""
    scale = scale if scale is not None else d ** -0.5
    name = (f"B={batch} s_q={s_q} h_q={heads} len~{mean_len} d={d}/{dv} bs={block}"
            + (" causal" if causal else "") + (" zero-row" if zero_row else "")
            + f" scale={scale:.4g}")
    g = _gen("flash_mla", name, dtype)
    lens = (torch.randn(batch, generator=g) * mean_len / 2 + mean_len).clamp(s_q, 2 * mean_len)
    lens = lens.round().to(torch.int32)
    if zero_row and batch > 1:
        lens[1] = 0
    max_blocks = max(1, -(-int(lens.max()) // block))

    def build(device: torch.device) -> dict[str, Any]:
        gg = _gen("flash_mla-build", name, dtype)
        dt = DTYPES[dtype]
        num_blocks = batch * max_blocks
        table = torch.randperm(num_blocks, generator=gg).view(batch, max_blocks)
        q = torch.randn(batch, s_q, heads, d, generator=gg)
        cache = torch.randn(num_blocks, block, 1, d, generator=gg)
        return {"q": q.to(device=device, dtype=dt), "kv_cache": cache.to(device=device, dtype=dt),
                "block_table": table.to(torch.int32).to(device),
                "cache_seqlens": lens.to(device), "head_dim_v": dv, "softmax_scale": scale,
                "causal": causal}

    total = int(lens.sum())
    es = _size(dtype)
    moved = total * d * es + batch * s_q * heads * (d + dv) * es
    return Case("flash_mla", name, dtype, build, "new", moved,
                flops=2 * heads * s_q * total * (d + dv))


# --------------------------------------------------------------------------- case sets
def topk_softmax_cases(dtype: str, size: Size) -> list[Case]:
    shapes = {"quick": [(3, 8, 2)], "small": [(1, 8, 2), (7, 64, 6), (64, 128, 8)],
              "full": [(1, 8, 2), (7, 64, 6), (64, 128, 8), (1000, 256, 8), (4096, 512, 8)]}
    cases = []
    for i, (t, e, k) in enumerate(shapes[size]):
        cases.append(topk_softmax_case(t, e, k, dtype, renormalize=i % 2 == 0))
        cases.append(topk_softmax_case(t, e, k, dtype, renormalize=True, ties=True,
                                       bias=i % 2 == 1))
    cases.append(topk_softmax_case(5, 16, 1, dtype, renormalize=False, bias=True,
                                   ids_dtype="int64"))
    return cases


def grouped_topk_cases(dtype: str, size: Size) -> list[Case]:
    shapes = {"quick": [(3, 16, 4, 2, 4)], "small": [(1, 64, 8, 4, 6), (7, 256, 8, 4, 8)],
              "full": [(1, 256, 8, 4, 8), (64, 256, 8, 4, 8), (4096, 256, 8, 4, 8),
                       (33, 160, 8, 3, 6)]}
    cases = []
    for t, e, grp, keep, k in shapes[size]:
        cases.append(grouped_topk_case(t, e, grp, keep, k, dtype))
        cases.append(grouped_topk_case(t, e, grp, keep, k, dtype, scoring_func=0,
                                       renormalize=False, scale=1.0, ties=True))
        cases.append(grouped_topk_case(t, e, grp, keep, k, dtype, neg_inf_row=True,
                                       bias=False))
    return cases


def align_cases(dtype: str, size: Size) -> list[Case]:
    if dtype != "fp32":  # integer op: one dtype is enough
        return []
    shapes = {"quick": [(3, 8, 2, 4)], "small": [(1, 8, 2, 16), (7, 64, 6, 16),
                                                 (64, 256, 8, 64)],
              "full": [(1, 8, 2, 64), (7, 64, 6, 64), (1000, 256, 8, 64), (4096, 128, 8, 64),
                       (16384, 256, 8, 64)]}
    cases = []
    for t, e, k, bs in shapes[size]:
        cases += [align_case(t, e, k, bs), align_case(t, e, k, bs, routing="sparse"),
                  align_case(t, e, k, bs, routing="one", ids_dtype="int64"),
                  align_case(t, e, k, bs, expert_map=True)]
    return cases


def moe_sum_cases(dtype: str, size: Size) -> list[Case]:
    shapes = {"quick": [(3, 2, 32)], "small": [(1, 2, 64), (7, 8, 96)],
              "full": [(1, 8, 4096), (64, 2, 4096), (4096, 8, 2048)]}
    return [moe_sum_case(t, k, h, dtype) for t, k, h in shapes[size]]


def experts_cases(dtype: str, size: Size) -> list[Case]:
    shapes = {"quick": [(3, 4, 2, 32, 48)],
              "small": [(1, 4, 2, 32, 48), (7, 8, 2, 64, 96), (64, 8, 6, 48, 80)],
              "full": [(1, 8, 2, 4096, 14336), (7, 64, 6, 2048, 704), (64, 128, 8, 2048, 768),
                       (1000, 8, 2, 1024, 768)]}
    cases = []
    for i, (t, e, k, h, n) in enumerate(shapes[size]):
        cases.append(experts_case(t, e, k, h, n, dtype))
        if i == 0:
            cases += [experts_case(t, e, k, h, n, dtype, activation="gelu"),
                      experts_case(t, e, k, h, n, dtype, activation="gelu_tanh"),
                      experts_case(t, e, 1, h, n, dtype, on_input=True),
                      experts_case(t, e, k, h, n, dtype, expert_map=True),
                      experts_case(t, e, k, h, n, dtype, global_experts=e + 4),
                      experts_case(t, e, k, h, n, dtype, routing="one")]
    return cases


def mla_cases(dtype: str, size: Size) -> list[Case]:
    if dtype == "fp32" and size == "full":
        return []
    shapes = {"quick": [(2, 1, 2, 70, 96, 64, 16)],
              "small": [(3, 1, 4, 130, 576, 512, 64), (3, 2, 4, 100, 96, 64, 16)],
              "full": [(16, 1, 16, 2048, 576, 512, 64), (16, 2, 128, 1024, 576, 512, 64)]}
    cases = []
    for b, s_q, h, n, d, dv, bs in shapes[size]:
        cases.append(mla_case(b, s_q, h, n, dtype, d=d, dv=dv, block=bs))
        if s_q > 1:
            cases.append(mla_case(b, s_q, h, n, dtype, d=d, dv=dv, block=bs, causal=False,
                                  scale=0.37))
    return cases
