"""Autoregressive token samplers with an explicit KV cache.

- VAR next-scale sampling (`sample`), with classifier-free guidance ramped over the scales, top-k / top-p, and the
  "more smooth" Gumbel variant; random numbers are drawn in the reference's order (label draw, then per scale the
  token draw and, if smooth, the Gumbel noise), so a seeded generator reproduces FoundationVision/VAR's
  `autoregressive_infer_cfg` token for token.
- Raster-order next-token sampling (`sample_raster`) for `RasterAR` as LlamaGen's `generate`: guidance
  uncond + (cond - uncond) s when s > 1 (optionally for the first tokens only, `cfg_interval`), temperature,
  top-k / top-p, and each token drawn as argmax(p / E) with exponential noise E fixed up front — what
  `torch.multinomial(p, 1)` computes, in the official draw order, so a seeded generator gives the official tokens
  and generator state. Sequential decoding (one call per token) and Jacobi decoding on the fixed-point engine
  give the same tokens; speculative Jacobi decoding (random acceptance) other tokens from the same distribution.
- Coarse-to-fine sampling (`sample_c2f`): the raster sampler over coarse labels, then one pass for the fine ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.c2f import C2F
from ..models.raster_ar import RasterAR
from ..models.var import VAR
from ..nn.attention import KVCache
from ..rng import Generator, SampleRNG
from ..tokenizers.msvq import MSVQVAE
from ..tokenizers.vq import VQVAE
from . import fixed_point
from .fixed_point import FixedPointResult


def top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 0.0, nucleus: str = "var") -> Tensor:
    """Mask (to -inf) all but the top_k logits (ties with the k-th survive) and the smallest set holding top_p
    of the probability (0 or >= 1: off). `nucleus` picks the reference's arithmetic: "var" sums the sorted
    probabilities from the smallest and drops while <= 1 - p; "llamagen" (HF's filter) sums from the largest and
    drops past p, shifted by one. They differ only by rounding at the boundary."""
    logits = logits.clone()
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if 0 < top_p < 1:
        if nucleus == "var":
            sorted_logits, order = logits.sort(dim=-1, descending=False)
            drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
            drop[..., -1:] = False  # always keep the most likely token
        else:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            past = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
            drop = torch.zeros_like(past)
            drop[..., 1:] = past[..., :-1]  # keep the first token past p (and always the top one)
        logits.masked_fill_(drop.scatter(order.ndim - 1, order, drop), -torch.inf)
    return logits


def exponential_like(t: Tensor, generator: Generator | None) -> Tensor:
    """Standard exponential noise shaped like t (B, ...), from one stream or one per sample."""
    if isinstance(generator, SampleRNG):
        return generator.exponential(*t.shape[1:], dtype=t.dtype)
    return torch.empty_like(t).exponential_(generator=generator)


def multinomial(probs: Tensor, generator: Generator | None) -> Tensor:
    """One draw per position of probs (B, n, V) -> (B, n), from one stream or one per sample."""
    if isinstance(generator, SampleRNG):
        return generator.multinomial(probs)
    B, V = probs.shape[0], probs.shape[-1]
    return torch.multinomial(probs.reshape(-1, V), 1, replacement=True, generator=generator).view(B, -1)


def gumbel_softmax(logits: Tensor, tau: float, generator: Generator | None) -> Tensor:
    g = -exponential_like(logits, generator).log()
    return ((logits + g) / tau).softmax(-1)


@dataclass
class VARSample:
    img: Tensor  # (B, C, H, W) in [0, 1]
    indices: list[Tensor]  # (B, pn^2) per scale
    f_hat: Tensor
    labels: Tensor
    trace: list[dict[str, Tensor]] = field(default_factory=list)  # per scale, when asked
    rounds: int = 0  # sequential transformer calls (one per scale)
    nfe: int = 0  # token positions run through the transformer per image (the prefix again without the cache)
    scale_seconds: list[float] = field(default_factory=list)  # wall time of each scale (model call + draw)


@dataclass
class Known:
    """Tokens forced at every scale (zero-shot in-/out-painting and class-conditional editing, as in the VAR
    paper): `indices` (B, pn^2) per scale and a bool `mask` (B, pn^2) per scale of the positions to force."""

    indices: list[Tensor]
    mask: list[Tensor]


@torch.no_grad()
def known_region(vae: MSVQVAE, img: Tensor, keep: Tensor, threshold: float = 0.5) -> Known:
    """Tokens of `img` (B, C, H, W in [-1, 1]) where `keep` (B, 1, H, W; 1 = keep the pixel) covers at least
    `threshold` of a token's area at that scale; everything else is generated."""
    idx = vae.img_to_indices(img)
    masks = [(F.interpolate(keep.float(), size=(pn, pn), mode="area") >= threshold).flatten(1)
             for pn in vae.quantize.patch_nums]
    return Known(idx, masks)


@torch.no_grad()
def sample(var: VAR, vae: MSVQVAE, labels: Tensor | int | None, batch: int | None = None, cfg: float = 1.5,
           top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, generator: Generator | None = None,
           known: Known | None = None, kv_cache: bool = True, trace: bool = False) -> VARSample:
    """Sample images scale by scale. labels: (B,) tensor, an int for all (< 0: unconditional), or None (drawn
    uniformly from `generator`, then `batch` is required). Guidance weight at scale si is cfg * si / (K - 1).
    `generator`: one stream for the batch (the reference's draw order), or a `SampleRNG` with one stream per image
    (an image then depends on its seed only, not on the batch it is sampled in).
    `known` forces tokens after each draw (the draws themselves are unchanged, so the random stream is too).
    `kv_cache=False` recomputes every earlier scale at each step (the uncached baseline of `pargen bench var`)."""
    c = var.config
    dev = var.pos_1LC.device
    if labels is None:
        if batch is None:
            raise ValueError("batch is required when labels are drawn")
        if isinstance(generator, SampleRNG):
            labels = generator.multinomial(torch.full((batch, c.num_classes), 1 / c.num_classes, device=dev))
        else:
            uniform = torch.full((1, c.num_classes), 1 / c.num_classes, device=dev)
            labels = torch.multinomial(uniform, num_samples=batch, replacement=True, generator=generator).view(batch)
    elif isinstance(labels, int):
        if batch is None:
            raise ValueError("batch is required with a single label")
        labels = torch.full((batch,), c.num_classes if labels < 0 else labels, device=dev)
    B, K, Cv = labels.shape[0], len(c.patch_nums), c.z_channels
    q = vae.quantize
    cond, ada = var.condition(torch.cat((labels, torch.full_like(labels, c.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x = cond.unsqueeze(1) + var.pos_start + lvl_pos[:, :1]
    cache = KVCache.empty(c.depth, 2 * B, c.H, c.L, c.C // c.H, like=x) if kv_cache else None
    prefix = None
    f_hat = x.new_zeros(B, Cv, c.patch_nums[-1], c.patch_nums[-1])
    indices, steps, seconds = [], [], []
    cur = nfe = 0
    for si, pn in enumerate(c.patch_nums):
        t0 = time.perf_counter()
        ratio = si / (K - 1)
        cur += pn * pn
        nfe += pn * pn if kv_cache else cur
        if kv_cache:
            for i, blk in enumerate(var.blocks):
                x = blk(x, ada, cache=cache, layer=i)
            cache.commit(pn * pn)
        else:  # the baseline: re-run the whole prefix under the block-causal mask, keep the newest scale
            prefix = x if prefix is None else torch.cat((prefix, x), 1)
            h = prefix
            for blk in var.blocks:
                h = blk(h, ada, var.attn_bias_for_masking[..., :cur, :cur])
            x = h[:, cur - pn * pn:]
        logits = var.logits(x, cond)
        t = cfg * ratio
        logits = (1 + t) * logits[:B] - t * logits[B:]
        probs = top_k_top_p(logits, top_k, top_p).softmax(-1)
        idx = multinomial(probs, generator)
        if more_smooth:  # display only: a soft Gumbel mix of codes (the reference's visualisation setting)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h = gumbel_softmax(logits.mul(1 + ratio), tau, generator) @ q.embedding.weight.unsqueeze(0)
        else:
            h = q.embedding(idx)
        if known is not None:
            m = known.mask[si].to(idx.device)
            idx = torch.where(m, known.indices[si].to(idx.device), idx)
            h = torch.where(m[..., None], q.embedding(idx), h)
        h = h.transpose(1, 2).reshape(B, Cv, pn, pn)
        f_hat, nxt = q.next_input(si, f_hat, h)
        indices.append(idx)
        if trace:
            steps.append({"logits_after_cfg": logits, "idx_Bl": idx, "h_BChw": h, "f_hat": f_hat,
                          "next_token_map_Cvae": nxt})
        if nxt is not None:
            x = var.word_embed(nxt.view(B, Cv, -1).transpose(1, 2)) + lvl_pos[:, cur: cur + c.patch_nums[si + 1] ** 2]
            x = x.repeat(2, 1, 1)
        seconds.append(time.perf_counter() - t0)
    del cache, prefix  # free the KV cache before the decoder allocates (held, it slowed a 256-px decode by 30%)
    img = vae.fhat_to_img(f_hat).add(1).mul(0.5)
    return VARSample(img, indices, f_hat, labels, steps, rounds=K, nfe=nfe, scale_seconds=seconds)


@dataclass
class RasterSample:
    img: Tensor | None  # (B, C, H, W) in [0, 1]; None when no tokenizer was given
    tokens: Tensor  # (B, N) raster order
    labels: Tensor
    rounds: int  # sequential model calls
    nfe: int  # token positions evaluated per image, summed over calls
    result: FixedPointResult | None = None  # the engine's record (iterations, residuals); None for SJD
    coarse: Tensor | None = None  # CTF: the stage-1 coarse labels (B, N)

    @property
    def tokens_per_call(self) -> float:
        return self.tokens.shape[1] / self.rounds


def guided(logits: Tensor, batch: int, cfg: float, guide: Tensor | None = None) -> Tensor:
    """LlamaGen's guidance on stacked (cond; uncond) logits (B, n, V); cfg <= 1 means one branch was run.
    `guide` (n,) bool: the positions to guide (the others take the conditional logits, as after cfg_interval)."""
    if cfg <= 1:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    out = uncond + (cond - uncond) * cfg
    return out if guide is None else torch.where(guide[:, None], out, cond)


def exponential_noise(batch: int, tokens: int, vocab: int, generator: Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
    """Per-position standard exponential noise (B, N, V), drawn once before sampling: from one stream in
    LlamaGen's order (token by token, (B, V) each: one `multinomial` call per token draws exactly that), or
    one stream per sample (`SampleRNG`)."""
    if isinstance(generator, SampleRNG):
        return generator.exponential(tokens, vocab)
    return torch.empty(tokens, batch, vocab, device=device).exponential_(generator=generator).transpose(0, 1)


def probs_of(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """softmax(filtered logits / T), as LlamaGen's `sample` (T floored at 1e-5; its top-p arithmetic)."""
    return top_k_top_p(logits / max(temperature, 1e-5), top_k, top_p, nucleus="llamagen").softmax(-1)


def pick(logits: Tensor, noise: Tensor | None, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The token at each position: argmax(p / E) for p = `probs_of(...)` and exponential noise E, an exact draw
    from p and bit for bit what `torch.multinomial(p, 1)` returns from the same noise; greedy argmax when T == 0
    (noise unused)."""
    if temperature == 0:
        return logits.argmax(-1)
    return (probs_of(logits, temperature, top_k, top_p) / noise).argmax(-1)


def pick_among(logits: Tensor, cand: Tensor, noise: Tensor | None, temperature: float) -> Tensor:
    """`pick` restricted to candidates: logits (..., V), cand (..., m) token ids with -1 as padding, noise
    (..., m); a draw from softmax(logits / T) over the candidates, at the cost of m entries instead of V."""
    sub = logits.gather(-1, cand.clamp(min=0)).masked_fill(cand < 0, -torch.inf)
    return cand.gather(-1, pick(sub, noise, temperature, 0, 0.0)[..., None])[..., 0]


class RasterOperator:
    """Token i = pick(logits_i(class, tokens < i), E_i) as a causal operator for the fixed-point engine: with the
    noise drawn up front, sampling is a deterministic triangular system, so sequential decoding is `window=1` and
    Jacobi decoding reproduces it token for token. The KV cache holds the committed input positions (position 0 is
    the class token, position p >= 1 reads token p - 1). `cfg_interval` > -1 guides tokens 0 .. cfg_interval + 1
    only (LlamaGen's rule; the unconditional branch is still run after)."""

    def __init__(self, model: RasterAR, labels: Tensor, cfg: float, temperature: float, top_k: int, top_p: float,
                 noise: Tensor | None, cfg_interval: int = -1):
        self.model, self.B, self.cfg, self.cfg_interval = model, labels.shape[0], cfg, cfg_interval
        self.draw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.lab = labels if cfg <= 1 else torch.cat((labels, torch.full_like(labels, -1)))
        self.noise = noise
        self.cache = model.new_cache(len(self.lab), like=model.rope)

    def logits(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Guided logits (B, stop - start, V) at positions [start, stop) given the tokens in x before them."""
        toks = x[:, max(start - 1, 0): stop - 1].repeat(len(self.lab) // self.B, 1)
        h = self.model.embed(self.lab if start == 0 else None, toks)
        guide = None
        if self.cfg_interval > -1:
            guide = torch.arange(start, stop, device=x.device) <= self.cfg_interval + 1
        return guided(self.model.run(h, start, self.cache), self.B, self.cfg, guide)

    def probs(self, x: Tensor, start: int, stop: int) -> Tensor:
        return probs_of(self.logits(x, start, stop), **self.draw)

    def __call__(self, x: Tensor, start: int, stop: int, need: Tensor | None = None) -> Tensor:
        logits = self.logits(x, start, stop)
        return pick(logits, None if self.noise is None else self.noise[:, start:stop], **self.draw)

    def commit(self, x: Tensor, stop: int) -> None:
        self.cache.commit(stop - self.cache.length)


def speculative_jacobi(op: RasterOperator, batch: int, tokens: int, vocab: int, window: int,
                       generator: torch.Generator | None) -> tuple[Tensor, int, int]:
    """Speculative Jacobi decoding (Teng et al., arXiv 2410.01699): each call evaluates a window of draft tokens
    after each sample's accepted prefix; from the left, a draft x drawn from q is accepted with probability
    min(1, p(x) / q(x)) under the new distribution p, the first rejected one is redrawn from max(0, p - q)
    (normalised) and accepted, and the drafts after it are redrawn from their new p. Fresh drafts are uniform.
    Every call accepts at least one token per sample and the result is distributed as sequential sampling (not
    the same tokens). Returns (tokens (B, N), sequential calls, positions evaluated per sample)."""
    B, N, V = batch, tokens, vocab
    dev = op.cache.k.device
    x = torch.randint(V, (B, N), generator=generator, device=dev)
    q = torch.full((B, N, V), 1 / V, device=dev)
    f = torch.zeros(B, dtype=torch.long, device=dev)  # accepted tokens per sample
    rows = torch.arange(B, device=dev)
    rounds = nfe = 0
    while bool((f < N).any()):
        c = int(f.min())
        end = (f + window).clamp(max=N)
        stop = int(end.max())
        p = op.probs(x, c, stop)  # (B, n, V) at positions c .. stop-1
        rounds += 1
        nfe += int((end - f).max())
        n = stop - c
        pos = torch.arange(c, stop, device=dev)[None]
        win = (pos >= f[:, None]) & (pos < end[:, None])
        xs = x[:, c:stop, None]
        px, qx = p.gather(2, xs)[..., 0], q[:, c:stop].gather(2, xs)[..., 0]
        u = torch.rand(B, n, generator=generator, device=dev)
        ok = (pos < f[:, None]) | (win & (u * qx <= px))
        j = c + ok.long().cumprod(1).sum(1)  # first rejected (or window end) position per sample
        rej = j < end
        if bool(rej.any()):  # redraw the rejected token from the residual; it is exact, so it is accepted
            jj = (j - c).clamp(max=n - 1)
            pj, qj = p[rows, jj], q[rows, (j).clamp(max=N - 1)]
            res = (pj - qj).clamp_min(0)
            res = torch.where(res.sum(1, keepdim=True) > 0, res, pj)
            redraw = torch.multinomial(res, 1, generator=generator)[:, 0]
            x[rows[rej], j[rej]] = redraw[rej]
        f_new = torch.where(rej, j + 1, end)
        later = win & (pos >= f_new[:, None])  # drafts left in the window: redraw them from their new p
        if bool(later.any()):
            fresh = torch.multinomial(p.reshape(-1, V), 1, generator=generator).view(B, n)
            x[:, c:stop] = torch.where(later, fresh, x[:, c:stop])
            q[:, c:stop] = torch.where(later[..., None], p, q[:, c:stop])
        f = f_new
        op.commit(x, int(f.min()))
    return x, rounds, nfe


def raster_tokens(model: RasterAR, labels: Tensor, cfg: float, temperature: float, top_k: int, top_p: float,
                  noise: Tensor | None, method: str = "sequential", window: int | None = None,
                  max_iters: int | None = None, generator: Generator | None = None,
                  cfg_interval: int = -1) -> tuple[Tensor, int, int, FixedPointResult | None]:
    """Tokens (B, N), sequential calls, positions evaluated and the engine's record: `sequential` (one token per
    call) or `jacobi` (Jacobi decoding, the same tokens) on the fixed-point engine, or `sjd` (speculative Jacobi
    decoding: the same distribution, random acceptance; draws its own random numbers from `generator`).
    `window`: tokens per Jacobi / SJD pass, default 16: on the bundled 8x8 models a 16-token window takes as many
    calls as the whole open window (24.9 vs 24.3 for raster-mnist over 12 seeds) at 75% of the time per image."""
    op = RasterOperator(model, labels, cfg, temperature, top_k, top_p, noise, cfg_interval)
    N = model.config.tokens
    x0 = labels.new_zeros(labels.shape[0], N)
    window = window or 16
    if method == "sjd":
        if isinstance(generator, SampleRNG):
            raise ValueError("speculative Jacobi decoding draws for the whole batch from one generator (how many "
                             "numbers depends on the batch); sample one image per call for per-seed results")
        if temperature <= 0:
            raise ValueError("speculative Jacobi decoding samples; use temperature > 0 (or method='jacobi')")
        x, rounds, nfe = speculative_jacobi(op, labels.shape[0], N, model.config.vocab_size, window, generator)
        return x, rounds, nfe, None
    if method == "sequential":
        res = fixed_point.sequential(op, x0)
    elif method == "jacobi":
        # tokens are compared exactly (tol 0); a token guess that changes is not a divergence, so no fallback
        res = fixed_point.solve(op, x0, window=window, max_iters=max_iters, patience=N + 1)
    else:
        raise ValueError(f"method must be 'sequential', 'jacobi' or 'sjd', not {method!r}")
    return res.x, res.rounds, res.nfe, res


@torch.no_grad()
def sample_raster(model: RasterAR, vq: VQVAE | None, labels: Tensor, cfg: float = 1.0, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 0.0, generator: Generator | None = None,
                  noise: Tensor | None = None, method: str = "sequential", window: int | None = None,
                  max_iters: int | None = None, cfg_interval: int = -1) -> RasterSample:
    """Sample images token by token in raster order (labels (B,), < 0: unconditional) as LlamaGen's `generate`.
    Random numbers: exponential noise (B, N, V) drawn up front from `generator` (or given as `noise`).
    method: `sequential` (one token per call, KV cache) or `jacobi` (Jacobi decoding on the fixed-point engine:
    every pass re-predicts a window of tokens from the current guess; same tokens as sequential, fewer calls
    when guesses survive); `window` bounds the tokens per Jacobi pass (default 16)."""
    c = model.config
    if noise is None and temperature > 0 and method != "sjd":
        noise = exponential_noise(labels.shape[0], c.tokens, c.vocab_size, generator, labels.device)
    x, rounds, nfe, res = raster_tokens(model, labels, cfg, temperature, top_k, top_p, noise, method, window,
                                        max_iters, generator, cfg_interval)
    img = None if vq is None else vq.indices_to_img(x).add(1).mul(0.5)
    return RasterSample(img, x, labels, rounds=rounds, nfe=nfe, result=res)


@torch.no_grad()
def sample_c2f(model: C2F, vq: VQVAE, labels: Tensor, cfg: float = 1.0, temperature: float = 1.0,
               aux_temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0, mask_to_cluster: bool = True,
               generator: Generator | None = None, method: str = "sequential",
               window: int | None = None) -> RasterSample:
    """CTF sampling: stage 1 draws the coarse labels in raster order (guidance `cfg`, `temperature`, top-k/p;
    sequential or Jacobi decoding), then stage 2 draws every fine label in one pass at `aux_temperature`
    (conditioned on the class, no guidance), masked to each coarse label's cluster unless `mask_to_cluster` is
    False. Exponential noise for stage 1, then for stage 2, is drawn from `generator` up front."""
    c = model.config
    B, N = labels.shape[0], c.grid * c.grid
    # masked, a fine label is drawn among its cluster's m members only: noise and draw over m, not V, entries
    table = model.members() if mask_to_cluster else None
    n1 = exponential_noise(B, N, c.coarse, generator, labels.device) if temperature > 0 and method != "sjd" \
        else None
    n2 = exponential_noise(B, N, c.vocab_size if table is None else table.shape[1], generator, labels.device) \
        if aux_temperature > 0 else None
    coarse, rounds, nfe, res = raster_tokens(model.stage1, labels, cfg, temperature, top_k, top_p, n1, method,
                                             window, generator=generator)
    logits = model.fine_logits(labels, coarse)
    if table is None:
        fine = pick(logits, n2, aux_temperature, 0, 0.0)
    else:
        fine = pick_among(logits, table[coarse], n2, aux_temperature)
    img = vq.indices_to_img(fine).add(1).mul(0.5)
    return RasterSample(img, fine, labels, rounds=rounds + 1, nfe=nfe + N, result=res, coarse=coarse)
