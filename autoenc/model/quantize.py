"""Vector quantization (van den Oord et al. 2017): the code is the nearest vector of a learned codebook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoenc.model.bottlenecks import Bottleneck, Latent, Pass
from autoenc.model.ranks import from_rank0, gathered, sum_over_ranks
from autoenc.util.errors import is_integer, is_number, require


class VQ(Bottleneck):
    """Each D-vector of the head (a code (B, D), or each position of (B, D, H, W)) is replaced by its nearest
    codebook entry, with the straight-through gradient z = h + sg(e − h). Adds β·commitment, and without
    `ema` the codebook loss; with `ema` the codebook follows exponential moving averages of the vectors
    assigned to it (the paper's appendix A.1). The codebook starts from k-means on the first
    `kmeans_batches` training batches (0: from N(0, I)); with `revive`, a code no training step has chosen
    for `dead_after` steps is moved onto a random encoder output of the current batch.

    Normalisation: a squared distance is summed over D, averaged over the positions of an example (one for
    a flat code) and over the batch; for a flat code this is the per-example sum the other terms use, for a
    grid the mean per position, so that β does not change with the grid's size. It is D times the mean over
    all elements that the paper's implementation takes.

    Where training state changes: `forward` runs the k-means initialisation (the batch must be quantized by
    the initialised codebook); `terms` (once per loss, while forward may run more than once in a step, e.g.
    for a Jacobian penalty) counts usage, updates the moving averages and revives dead codes, after the
    loss has used the codebook of this step. Both act only in training mode (`self.training`). Under DDP,
    counts and sums are summed over ranks and the k-means codebook and revived vectors are rank 0's, so
    every rank holds the same codebook."""

    def __init__(self, codes: int = 512, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5, kmeans_batches: int = 1, kmeans_iters: int = 10, dead_after: int = 100,
                 revive: bool = True):
        super().__init__(None)
        require(is_integer(codes) and codes >= 1, "bottleneck.codes", codes, "an integer ≥ 1")
        require(is_number(beta) and beta >= 0, "bottleneck.beta", beta, "a number ≥ 0")
        require(isinstance(ema, bool), "bottleneck.ema", ema, "true or false")
        require(is_number(decay) and 0 <= decay < 1, "bottleneck.decay", decay, "a number in [0, 1)")
        require(is_number(eps) and eps > 0, "bottleneck.eps", eps, "a number > 0")
        require(is_integer(kmeans_batches) and kmeans_batches >= 0, "bottleneck.kmeans_batches", kmeans_batches,
                "an integer ≥ 0 (0: no k-means initialisation)")
        require(is_integer(kmeans_iters) and kmeans_iters >= 0, "bottleneck.kmeans_iters", kmeans_iters, "an integer ≥ 0")
        require(is_integer(dead_after) and dead_after >= 1, "bottleneck.dead_after", dead_after, "an integer ≥ 1")
        require(isinstance(revive, bool), "bottleneck.revive", revive, "true or false")
        self.codes, self.beta, self.ema, self.decay, self.eps = codes, beta, ema, decay, eps
        self.kmeans_batches, self.kmeans_iters = kmeans_batches, kmeans_iters
        self.dead_after, self.revive = dead_after, revive
        self.latent_dim = 0
        self._pool: list[torch.Tensor] = []  # the k-means batches seen so far (not state: see _initialise)
        self._generator: torch.Generator | None = None  # the last training forward's, for revival's draws

    per_position = True

    def setup(self, latent_dim, grid=()):
        self.latent_dim = latent_dim
        codebook = torch.randn(self.codes, latent_dim)
        if self.ema:
            self.register_buffer("codebook", codebook)
            # each code's moving count N_i and sum m_i; a count of 1 and sum e_i keep e_i until it is used
            self.register_buffer("cluster_size", torch.ones(self.codes))
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("since_used", torch.zeros(self.codes, dtype=torch.long))  # training steps

    def forward(self, h, generator=None):
        if h.dim() < 2 or h.shape[1] != self.latent_dim:
            raise ValueError(f"bottleneck=vq quantizes codes (B, {self.latent_dim}, …); got shape {tuple(h.shape)}")
        flat = _rows(h)
        with torch.no_grad():
            if self.training:
                self._generator = generator
                if self.kmeans_batches and not self.initialised:
                    self._initialise(flat.detach(), generator)
            indices = self.nearest(flat).view(h.shape[0], *h.shape[2:])
            e = self.lookup(indices).to(h.dtype)
        z = h + (e - h).detach()
        return Latent(z, z, h, indices=indices)

    @torch.no_grad()
    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """The index of each row's nearest code (squared Euclidean distance)."""
        return _nearest(rows, self.codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The quantized code of indices (B,) or (B, H, W): (B, D) or (B, D, H, W) (differentiable in the
        codebook where it is a parameter)."""
        e = F.embedding(indices, self.codebook)
        return e if e.dim() == 2 else e.movedim(-1, 1)

    def usage(self, indices: torch.Tensor) -> torch.Tensor:
        """How many of the vectors in `indices` chose each code, shape (codes,)."""
        return torch.bincount(indices.reshape(-1), minlength=self.codes).float()

    def tally(self, latent):
        return {"usage": self.usage(latent.indices)}

    def split_figures(self, stats):
        """Over a split: the share of codes used, the perplexity of their use, the share dead (unused in
        training for `dead_after` steps), and each code's share of the positions (code_frequency)."""
        usage = stats["usage"]
        return {"codes_used": (usage > 0).float().mean(), "perplexity": perplexity(usage),
                "dead_codes": (self.since_used >= self.dead_after).float().mean(),
                "code_frequency": usage / usage.sum().clamp_min(1)}

    def terms(self, latent: Latent, pass_: Pass):
        rows = _rows(latent.h).float()
        e = _rows(self.lookup(latent.indices)).float()
        commitment = (rows - e.detach()).pow(2).sum(1).mean()
        figures = {"commitment": commitment.detach()}
        term = self.beta * commitment
        if not self.ema:
            codebook = (rows.detach() - e).pow(2).sum(1).mean()
            term = term + codebook
            figures["codebook"] = codebook.detach()
        counts = self.usage(latent.indices)
        dead = self.since_used >= self.dead_after
        if self.training:
            counts, dead = self._learn(rows.detach(), latent.indices.reshape(-1), counts)
        else:
            sum_over_ranks(counts)  # the global batch's use, as in training
        # the batch's figures; a split's (codes_used, perplexity, dead_codes) come from split_figures
        figures |= {"batch_perplexity": perplexity(counts), "batch_codes_used": (counts > 0).float().mean()}
        if self.training:
            figures["dead_codes"] = dead.float().mean()
        return term, figures

    @torch.no_grad()
    def _learn(self, rows, indices, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's changes: usage counts, the EMA update, revival. Returns the global batch's
        counts and the codes dead before revival."""
        if self.ema:
            sums = torch.zeros(self.codes, rows.shape[1], device=rows.device).index_add_(0, indices, rows)
            both = torch.cat([counts[:, None], sums], 1)
            sum_over_ranks(both)
            counts, sums = both[:, 0], both[:, 1:]
        else:
            sum_over_ranks(counts)
        self.since_used.add_(1).masked_fill_(counts > 0, 0)
        dead = self.since_used >= self.dead_after
        if self.ema:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing only for the division (the stored counts stay the plain averages): no
            # code's count is zero, and the smoothed counts keep the total N
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.codes * self.eps) * n
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.revive and dead.any():
            self._revive(dead, rows)
        return counts, dead

    def _revive(self, dead: torch.Tensor, rows: torch.Tensor) -> None:
        """Moves each dead code onto a random row of the global batch (rank 0's draw) as a fresh cluster of one."""
        rows = gathered(rows)  # every rank's rows, in the order of the global batch: DDP draws what one process would
        n, g = int(dead.sum()), self._generator
        device = g.device if g is not None else rows.device
        pick = (torch.randperm(len(rows), generator=g, device=device)[:n] if len(rows) >= n
                else torch.randint(len(rows), (n,), generator=g, device=device))
        fresh = rows[pick.to(rows.device)].contiguous()
        from_rank0(fresh)
        # .data: without EMA the codebook is a parameter this step's graph has used (its gradient then
        # lands on the revived row, which the next step's codebook loss corrects)
        self.codebook.data[dead] = fresh.to(self.codebook.dtype)
        self.since_used[dead] = 0
        if self.ema:
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = fresh

    def _initialise(self, rows: torch.Tensor, generator) -> None:
        """k-means over the training batches seen so far (warm-started from the last batch's centres) sets
        the codebook (and the EMA's counts: per batch, at least 1); after `kmeans_batches` batches the
        codebook is initialised. A run resumed within those batches starts its own pool, from the saved
        codebook."""
        self._pool.append(gathered(rows.float()))  # the global batch, so DDP starts where one process would
        data = torch.cat(self._pool)
        warm = self.codebook.detach().float() if len(self._pool) > 1 else None
        centres, counts = kmeans(data, self.codes, self.kmeans_iters, generator, warm)
        counts = counts / len(self._pool)  # a batch's counts, the scale of the EMA's N_i
        from_rank0(centres)
        from_rank0(counts)
        self.codebook.data.copy_(centres)
        if self.ema:
            self.cluster_size.copy_(counts.clamp_min(1))
            self.embed_sum.copy_(centres * self.cluster_size[:, None])
        if len(self._pool) >= self.kmeans_batches:
            self.initialised.fill_(True)
            self._pool = []


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the codes' use: how many codes the use is spread over as evenly."""
    p = counts / counts.sum().clamp_min(1)
    return (-(p * p.clamp_min(1e-30).log()).sum()).exp()


def _rows(h: torch.Tensor) -> torch.Tensor:
    """(B, D, *S) as rows (B·ΠS, D): one row per position."""
    return h.movedim(1, -1).reshape(-1, h.shape[1])


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """The index of each row of x's nearest centre, ‖x‖² − 2x·c + ‖c‖² in float32 (also under autocast),
    about `chunk` distances at a time."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        c = centres.float()
        c_sq = c.pow(2).sum(1)
        out = [(r.pow(2).sum(1, keepdim=True) - 2 * r @ c.t() + c_sq).argmin(1)
               for r in x.float().split(max(1, chunk // len(c)))]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of x: k centres and each one's count of rows. Starts from `init`, else
    from k-means++ seeding (Arthur & Vassilvitskii 2007: each next centre a row drawn with probability ∝
    its squared distance to the nearest centre so far, so that separated clusters each get one; Lloyd's
    iterations alone cannot move a centre out of a cluster that holds two); with fewer than k rows, rows
    drawn with replacement plus noise of 1% of x's spread, so copies can separate. An empty cluster keeps
    its centre."""
    n = len(x)
    if init is not None:
        centres = init.clone()
    else:
        device = generator.device if generator is not None else x.device
        if n >= k:
            chosen = [int(torch.randint(n, (1,), generator=generator, device=device))]
            d2 = (x - x[chosen[0]]).pow(2).sum(1)
            for _ in range(k - 1):
                w = d2.to(device)
                w = w if w.sum() > 0 else torch.ones_like(w)  # every row on a centre: any row will do
                chosen.append(int(torch.multinomial(w, 1, generator=generator)))
                d2 = torch.minimum(d2, (x - x[chosen[-1]]).pow(2).sum(1))
            centres = x[chosen].clone()
        else:
            pick = torch.randint(n, (k,), generator=generator, device=device).to(x.device)
            noise = torch.randn(k, x.shape[1], generator=generator, device=device).to(x.device)
            spread = x.std().nan_to_num(1.0) if x.numel() > 1 else x.new_tensor(1.0)
            centres = x[pick] + 0.01 * spread.clamp_min(1e-3) * noise
    for _ in range(iters):
        assign = _nearest(x, centres)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return centres, torch.bincount(_nearest(x, centres), minlength=k).to(x.dtype)
