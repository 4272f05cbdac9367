"""Per-row sampling: every row of a batch draws its next token from its own random stream.

    draws = Draws.of([Sampling(do_sample=True, temperature=0.7, seed=7), None, ...], steps=[3, 0, ...],
                     device=logits.device)
    tokens, finite = sample(logits, draws)   # (B,) next tokens, (B,) whether row b's scores were finite

Rows that do not sample (None, or ``do_sample`` False) take the arg-max. A sampling row's
draw for its n-th new token depends on its seed, n and its own logits only: not on the other
rows, its slot in the batch, how many steps the others ran, nor torch's global generator
(nothing here reads or seeds it). A row without a seed gets 64 bits of fresh entropy from
`secrets` (`fresh_seed`), so no request can predict or steer another's stream.

How a row draws. The Gumbel-max trick: arg-max over the vocabulary of ``logits / T + G``,
G i.i.d. Gumbel(0, 1), is a draw from softmax(logits / T); with the tokens top-k / top-p
remove set to -inf first, from the filtered, renormalised distribution. G comes from a
counter-based generator: a 32-bit hash of (row key, vocabulary index), the row key a hash
of (seed, n). The hash (`mix32`: three xor-shift-multiply rounds) runs on int64 tensors
holding 32-bit values with multipliers below 2**31, so no product leaves int64 (signed
overflow is undefined in C++, kernels need not wrap): CPU and GPU hash to the same bits (the
logs that turn them into Gumbel noise may differ in the last bit, so a draw on the two
devices can differ only at a near-tie). Costs: some 20 elementwise passes over the (n, V)
scores of the n sampling rows (memory-bound on a GPU); top-p adds a sort, as before.

Why counter-based, not a `torch.Generator` per row. vLLM's sampler gives each seeded
request a Generator and fills that row's exponential noise with it,
``q[i].exponential_(generator=g)`` (`v1/sample/ops/topk_topp_sampler.py`, `random_sample`):
one kernel per seeded row each step, per-request generator objects whose position must be
carried along, a CPU stream (Mersenne twister) unlike the CUDA one (Philox). vLLM's newer GPU
sampler (`v1/worker/gpu/sample/gumbel.py`) keys Gumbel noise on (request seed, position)
instead, as here. A hash keeps sampling one set of vectorised kernels for any mix of rows
and seeds, with no state (a row's position in its stream is its token count), no host
synchronisation (the row keys travel with the row settings, copied without waiting), and
nothing a CUDA graph could not capture should sampling ever move into the decode graph.

Non-finite scores never raise here: `sample` returns with the tokens a (B,) mask, False for a
row whose logits (or logits / T) hold NaN or +inf, or nothing above -inf. That row's token
is meaningless; the caller fails that row alone.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor

log = logging.getLogger(__name__)
MASK32 = 0xFFFFFFFF
#: (shift, multiplier) of each round of `mix32`: odd multipliers below 2**31 (see the module docstring)
_ROUNDS = ((16, 0x7FEB352D), (15, 0x045D9F3B), (15, 0x2C1B3C6D))


def fresh_seed() -> int:
    """64 bits of entropy from the operating system (a row with no seed of its own)."""
    return secrets.randbits(64)


@dataclass
class Sampling:
    """One row's decoding settings (transformers' names) and the seed of its random stream,
    64 bits (default: fresh entropy: a row built without one is unpredictable)."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    seed: int = field(default_factory=fresh_seed)
    logprobs: int | None = None  # report each new token's log-probability and the top k others' (None: not)
    presence_penalty: float = 0.0  # subtracted from a token's score once it is among the row's new tokens
    frequency_penalty: float = 0.0  # ... times the number of times it is
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its score) for every step

    @property
    def adjusts(self) -> bool:
        """The row's scores are changed before its token is chosen (penalties or a bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def penalised(self) -> bool:
        """Its scores depend on its own new tokens (OpenAI's presence and frequency penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty)


def adjusted(logits: torch.Tensor, samplings: Sequence[Sampling | None], tokens: Sequence[Sequence[int]]
             ) -> torch.Tensor:
    """(B, V) scores with each row's `logit_bias` added and its penalties subtracted (OpenAI's
    definition: score - frequency_penalty * count - presence_penalty * (count > 0), count the
    times a token is among the row's new tokens `tokens[b]`), as float32; `logits` itself
    where no row adjusts. One scatter of (row, token, amount) triples built on the host."""
    rows, cols, amounts = [], [], []
    for b, (s, seen) in enumerate(zip(samplings, tokens)):
        if s is None or not s.adjusts:
            continue
        for token, bias in s.logit_bias:
            rows.append(b), cols.append(token), amounts.append(bias)
        if s.penalised:
            counts: dict[int, int] = {}
            for t in seen:
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                rows.append(b), cols.append(t), amounts.append(-s.frequency_penalty * c - s.presence_penalty)
    if not rows:
        return logits
    index = _to_device(torch.tensor([rows, cols], dtype=torch.long), logits.device)
    values = _to_device(torch.tensor(amounts, dtype=torch.float32), logits.device)
    return logits.float().index_put_((index[0], index[1]), values, accumulate=True)


@dataclass
class TokenLogprob:
    """A new token's log-probability under the model (the log-softmax of its raw scores,
    before temperature and filters: what a forward over the text gives), and the most
    likely tokens' ``top``: [(token id, log-probability)], best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) scores, (B,) chosen tokens -> (B, 1 + 2k) float32: each row's chosen token's
    log-probability, its k best log-probabilities, and those tokens' ids (exact as floats
    below 2**24: every vocabulary): one tensor, one copy to the host.

    The log-softmax is not written out (a score minus the row's fp32 log-sum-exp, read
    where needed): over a 128k vocabulary and an echoed prompt's every position
    (`scoring.py`) that (B, V) tensor is what the step's time went to."""
    lse = torch.logsumexp(logits.float(), -1, keepdim=True)  # (B, 1)
    picked = logits.gather(1, chosen.view(-1, 1)).float() - lse
    if k == 1:  # lm-eval's: one reduction, not a top-k selection over the vocabulary
        values, indices = logits.max(-1, keepdim=True)
    else:  # the order of the scores is the log-probabilities'
        values, indices = logits.topk(min(k, logits.shape[-1]), -1)
    return torch.cat([picked, values.float() - lse, indices.float()], 1)


def token_logprobs(rows: Sequence[Sampling | None], tokens: Sequence[int], table: list[list[float]]
                   ) -> list[TokenLogprob | None]:
    """Per row, its `TokenLogprob` from a host copy of `logprobs_of` (None: a row that did
    not ask, or an empty slot); each row keeps its own k of the batch's largest."""
    out: list[TokenLogprob | None] = []
    for s, token, values in zip(rows, tokens, table):
        if s is None or s.logprobs is None:
            out.append(None)
            continue
        k = (len(values) - 1) // 2
        top = [(int(values[1 + k + j]), values[1 + j]) for j in range(min(s.logprobs, k))]
        out.append(TokenLogprob(token, values[0], top))
    return out


class NonFiniteScoresError(RuntimeError):
    """A row's scores were NaN or infinite: there is nothing to sample from (a failure of
    the model, not of the request's options, which `GenerationOptions.parse` keeps finite)."""


def mix32(x):
    """A bijective 32-bit mixer: a Python int, or an int64 tensor of values in [0, 2**32)
    (mixed in place: large ones are the (B, V) noise)."""
    for shift, multiplier in _ROUNDS:
        x ^= x >> shift
        x *= multiplier
        x &= MASK32
    x ^= x >> 16
    return x


def row_key(seed: int, step: int) -> int:
    """The 32-bit key of draw number `step` (a row's new token index) of stream `seed` (64 bits)."""
    seed &= (1 << 64) - 1
    return mix32(mix32(mix32(seed & MASK32) ^ (seed >> 32)) ^ (step & MASK32))


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n,) row keys -> (n, V) float32 Gumbel(0, 1) noise, entry [i, v] a function of (keys[i], v) only."""
    bits = mix32(mix32(torch.arange(vocab, dtype=torch.long, device=keys.device))[None, :] ^ keys[:, None])
    u = bits.float().add_(0.5).mul_(2.0**-32).clamp_(max=1.0 - 2.0**-24)  # in (0, 1): E below stays finite
    # E = -log(1 - u) ~ Exp(1) and G = -log(E); log1p resolves small u, where the winners are
    return torch.log1p(-u).neg_().log_().neg_()


@dataclass
class Draws:
    """The rows of a batch that sample, and their settings, on the logits' device.

    Attributes:
        rows: (n,) long, which rows of the batch sample.
        keys: (n,) long, each row's `row_key` for this draw.
        temperature, top_p: (n,) float32; top_k: (n,) long (0: no top-k).
        top_k_max: the largest top-k of a row (0: none), top_p_any: some row has a top-p
            (decided on the host: no filter, no sort).
    """

    rows: torch.Tensor
    keys: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    top_k_max: int
    top_p_any: bool

    @classmethod
    def of(cls, samplings: Sequence[Sampling | None], steps: Sequence[int], device: torch.device) -> "Draws | None":
        """The draws of rows with settings `samplings` (None: an empty slot) at their new
        token index `steps`; None when no row samples."""
        picked = [(b, s, n) for b, (s, n) in enumerate(zip(samplings, steps)) if s is not None and s.do_sample]
        if not picked:
            return None
        ints = _to_device(torch.tensor([[b, row_key(s.seed, n), s.top_k] for b, s, n in picked], dtype=torch.long),
                          device)
        floats = _to_device(torch.tensor([[s.temperature, s.top_p] for _, s, _ in picked], dtype=torch.float32),
                            device)
        return cls(rows=ints[:, 0], keys=ints[:, 1], top_k=ints[:, 2], temperature=floats[:, 0], top_p=floats[:, 1],
                   top_k_max=max(s.top_k for _, s, _ in picked), top_p_any=any(s.top_p < 1 for _, s, _ in picked))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the device (pinned, non-blocking)."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, V) scores -> (B,) bool: no NaN or +inf, and some token above -inf."""
    return (x < float("inf")).all(-1) & (x > float("-inf")).any(-1)


def sample(logits: torch.Tensor, draws: Draws | None,
           greedy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens: the arg-max for rows that do not sample, a draw for the rows of `draws`.

    Args:
        logits: (B, V) the step's scores.
        draws: the sampling rows (`Draws.of`); None: every row greedy.
        greedy: (B,) the arg-max of `logits` where the caller has it already (the decode step's).

    Returns:
        (B,) long tokens, and (B,) bool: row b's scores were finite (else its token is meaningless).
    """
    finite = finite_rows(logits)
    tokens = logits.argmax(-1) if greedy is None else greedy
    if draws is None:
        return tokens, finite
    x = logits.index_select(0, draws.rows).float() / draws.temperature[:, None]  # (n, V)
    ok = finite.index_select(0, draws.rows) & finite_rows(x)  # logits / T may overflow where logits did not
    x = _filter(x, draws)
    chosen = _fused_draw(x, draws.keys) if x.is_cuda else _draw(x, draws.keys)
    return tokens.index_copy(0, draws.rows, chosen), finite.index_copy(0, draws.rows, ok)


def _draw(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(n, V) filtered scaled scores, (n,) row keys -> (n,) each row's draw: arg-max of x + G."""
    return (x + gumbel(keys, x.shape[-1])).argmax(-1)


def _fused_draw(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`_draw` compiled for the GPU: the hash, the logs and the arg-max of the (n, V) noise in
    one kernel reading the scores once, where eagerly each of some 20 passes reads and writes
    an (n, V) int64 or float32 tensor (measured: temperature-only sampling of 64 rows of a
    128,256 vocabulary took 1.41 ms, against 0.39 for the one-generator sampler it replaced).
    Where it cannot be compiled (no Triton, say) `_draw` runs as it is, from then on."""
    global _compiled_draw
    if _compiled_draw is not None:
        try:
            return _compiled_draw(x, keys)
        except Exception as e:  # the compiler's failure: sampling goes on uncompiled
            log.warning("sampling's noise not compiled (%s: %s); drawing it eagerly", type(e).__name__, e)
            _compiled_draw = None
    return _draw(x, keys)


_compiled_draw = torch.compile(_draw, dynamic=True)


def _filter(x: torch.Tensor, draws: Draws) -> torch.Tensor:
    """(n, V) scaled scores with the tokens each row's top-k, then top-p (transformers'
    order), removes set to -inf. Both cut by value, so tied scores (common in bf16) stay or
    go together, whatever the batch: top-k keeps every token scoring at least the k-th."""
    if not (draws.top_k_max or draws.top_p_any):
        return x
    vocab = x.shape[-1]
    k = torch.where(draws.top_k > 0, draws.top_k.clamp(max=vocab), vocab)[:, None]  # (n, 1)
    if not draws.top_p_any:  # top-k alone: the k-th score of a partial sort
        top = x.topk(min(draws.top_k_max, vocab)).values
        kth = top.gather(1, k.clamp(max=top.shape[-1]) - 1).masked_fill(k == vocab, float("-inf"))
        return x.masked_fill(x < kth, float("-inf"))
    ordered, order = x.sort(dim=-1, descending=True, stable=True)
    if draws.top_k_max:
        kth = ordered.gather(1, k - 1)
        x = x.masked_fill(x < kth, float("-inf"))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(-1)
    # the smallest set whose mass reaches p (the first token always); p = 1 keeps all, rounding or not
    drop = (probs.cumsum(-1) - probs > draws.top_p[:, None]) & (draws.top_p < 1)[:, None]
    return x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))


class RowSampler(LogitsProcessor):
    """transformers `generate()`'s last logits processor for rows of different settings and
    seeds in one batch: `generate` runs greedy (``do_sample=False``) and this returns scores
    whose arg-max is each row's token from `sample` (its draw number = the step), so the
    arg-max `generate` takes is the row's own sample.

    Attributes:
        finite: (B,) bool, each row's scores were finite at every step so far (None before the first).
    """

    def __init__(self, samplings: Sequence[Sampling]):
        self.samplings = list(samplings)
        self.step = 0
        self.finite: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        draws = Draws.of(self.samplings, [self.step] * len(self.samplings), scores.device)
        if any(s.adjusts for s in self.samplings):  # the new tokens: the decoder's ids after its start token
            new = input_ids[:, input_ids.shape[1] - self.step:].tolist() if self.step else [[]] * len(self.samplings)
            scores = adjusted(scores, self.samplings, new)
        tokens, finite = sample(scores, draws)
        self.step += 1
        self.finite = finite if self.finite is None else self.finite & finite
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)

    def finite_per_row(self) -> list[bool]:
        """Per row: its scores stayed finite (every row, before any step)."""
        return [True] * len(self.samplings) if self.finite is None else self.finite.tolist()


__all__ = ["Sampling", "adjusted", "TokenLogprob", "logprobs_of", "token_logprobs", "Draws", "sample", "finite_rows", "gumbel", "row_key", "mix32", "fresh_seed", "RowSampler",
           "NonFiniteScoresError"]
