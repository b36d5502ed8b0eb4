"""Column-sharded subspace maths for TWA, as pure tensor functions.

Rank r holds X[:, S_r], the slice S_r of every selected snapshot (n x d_r). Every
quantity that needs the full width D is a sum over ranks of a per-slice partial
product, so it costs one all-reduce of a few floats; the ``reduce`` argument is
that all-reduce (``comm.all_reduce`` in a job, the identity in one process).

Directions are always an explicit linear combination of the snapshots,
P = M X (per coefficient block), so the averaging weights alpha with
w = sum_i alpha_i w_i can be reported exactly whatever the basis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from twa_scale.twa.quant import DenseP, Kernels, PStorage, build_storage

__all__ = ["Reduce", "Piece", "Basis", "GrowingBasis", "identity_reduce", "gram", "trajectory_spread",
           "sequential_cholesky", "orthonormalize", "build_basis", "local_pieces"]

Reduce = Callable[..., torch.Tensor]  # (tensor, op="sum"|"min"|"max") -> tensor, in place
# Columns processed at once when building/applying the basis: bounds temporaries to
# n * CHUNK floats however wide a rank's slice is.
CHUNK_COLUMNS = 1 << 18


def identity_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The all-reduce of a single process."""
    return t


# --- Gram matrix and Gram-Schmidt in Gram form ---------------------------------------------
def gram(local: torch.Tensor, reduce: Reduce = identity_reduce) -> torch.Tensor:
    """G = X Xᵀ (float64) summed over ranks: one all-reduce of n*n floats.

    Accumulated in float64 because snapshots of one trajectory are nearly
    collinear; fp32 Gram entries would lose the small residuals that decide rank.
    """
    n, d = local.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=local.device)
    for s in range(0, d, CHUNK_COLUMNS):
        x = local[:, s:s + CHUNK_COLUMNS].double()
        g += x @ x.T
    return reduce(g)


def trajectory_spread(g: torch.Tensor) -> float:
    """How far the snapshots reach from their mean: the largest singular value of the centred snapshots,
    from their Gram matrix (n x n, float64), so it costs no pass over the weights and no collective."""
    n = g.shape[0]
    c = torch.eye(n, dtype=g.dtype, device=g.device) - 1.0 / n
    return math.sqrt(max(float(torch.linalg.eigvalsh(c @ g @ c)[-1]), 0.0))


def sequential_cholesky(g: torch.Tensor, tol: float, floor: float = 0.0
                        ) -> tuple[torch.Tensor, list[int], list[float]]:
    """Gram-Schmidt, in Gram form, in the given order, dropping near-dependent vectors.

    Returns (R, kept, residuals): R (k x k) upper triangular with G[kept][:, kept] = RᵀR,
    the kept indices, and each vector's residual norm relative to its own norm
    (what survives after removing the earlier directions). A vector whose relative
    residual is <= tol, or whose absolute residual is <= ``floor``, is dropped instead of
    normalised, so no NaN/inf can appear.
    """
    n = g.shape[0]
    kept: list[int] = []
    rel: list[float] = []
    r = g.new_zeros(0, 0)
    for i in range(n):
        norm2 = float(g[i, i])
        # coordinates of vector i on the basis so far: solve Rᵀ c = G[kept, i]
        coord = (torch.linalg.solve_triangular(r.T, g[kept, i].unsqueeze(1), upper=False).squeeze(1)
                 if kept else g.new_zeros(0))
        resid2 = norm2 - float(coord @ coord)
        frac = math.sqrt(max(resid2, 0.0) / norm2) if norm2 > 0 else 0.0
        rel.append(frac)
        if frac <= tol or math.sqrt(max(resid2, 0.0)) <= floor:
            continue
        k = len(kept)
        grown = g.new_zeros(k + 1, k + 1)
        grown[:k, :k] = r
        grown[:k, k] = coord
        grown[k, k] = math.sqrt(resid2)
        r = grown
        kept.append(i)
    return r, kept, rel


def _apply(m: torch.Tensor, local: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = M @ X computed in float64 chunks, stored fp32 (M small, X wide)."""
    k, d = m.shape[0], local.shape[1]
    if out is None:
        out = torch.empty(k, d, dtype=torch.float32, device=local.device)
    for s in range(0, d, CHUNK_COLUMNS):
        out[:, s:s + CHUNK_COLUMNS] = (m @ local[:, s:s + CHUNK_COLUMNS].double()).float()
    return out


def orthonormalize(local: torch.Tensor, combo: torch.Tensor, *, reduce: Reduce = identity_reduce,
                   tol: float = 1e-5, floor: float = 0.0, g: torch.Tensor | None = None) -> dict:
    """Orthonormal basis of span{combo @ X} by Cholesky-QR twice, in Gram-Schmidt order.

    ``combo`` (m x n, float64) names the vectors to orthonormalise as combinations
    of the snapshots (identity: raw snapshots; I - 11ᵀ/n: centred ones).
    Pass 1 works on the Gram matrix (one n x n all-reduce) and drops vectors whose
    relative residual is <= tol or absolute residual <= floor. Pass 2 re-orthogonalises the fp32 result against
    its own Gram matrix (one k x k all-reduce), which removes the rounding left by
    pass 1. Returns {"Q": k x d_r fp32, "M": k x n float64 with Q = M X, "kept",
    "residuals", "dropped"}.
    """
    if g is None:
        g = gram(local, reduce)
    gv = combo @ g @ combo.T
    r1, kept, rel = sequential_cholesky(gv, tol, floor)
    if not kept:
        return {"Q": local.new_zeros(0, local.shape[1]), "M": combo.new_zeros(0, combo.shape[1]),
                "kept": [], "residuals": rel, "dropped": list(range(combo.shape[0]))}
    eye = torch.eye(len(kept), dtype=torch.float64, device=g.device)
    m = torch.linalg.solve_triangular(r1.T, eye, upper=False) @ combo[kept]  # R⁻ᵀ V
    q = _apply(m, local)
    g2 = gram(q, reduce)
    r2 = torch.linalg.cholesky(g2, upper=True)
    t2 = torch.linalg.solve_triangular(r2.T, eye, upper=False)
    m = t2 @ m
    q = _apply_small(t2, q)
    dropped = [i for i in range(combo.shape[0]) if i not in kept]
    return {"Q": q, "M": m, "kept": kept, "residuals": rel, "dropped": dropped}


def _apply_small(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q <- t @ q in place, chunk by chunk (t is k x k, float64)."""
    for s in range(0, q.shape[1], CHUNK_COLUMNS):
        q[:, s:s + CHUNK_COLUMNS] = (t @ q[:, s:s + CHUNK_COLUMNS].double()).float()
    return q


# --- the basis a rank holds -------------------------------------------------------------------
@dataclasses.dataclass
class Piece:
    """A run of local columns [lo, hi) inside one layer block."""
    lo: int
    hi: int
    block: int        # index into the layer blocks (quantisation range)
    coef: int         # coefficient column (0 in global mode, == block in layer-wise mode)


def local_pieces(blocks: Sequence[tuple[int, int]], start: int, stop: int, layerwise: bool,
                 max_columns: int = CHUNK_COLUMNS) -> list[Piece]:
    """Cut [start, stop) along layer-block boundaries, then into runs of <= max_columns."""
    out = []
    for b, (bs, be) in enumerate(blocks):
        lo, hi = max(bs, start), min(be, stop)
        for s in range(lo, hi, max_columns):
            out.append(Piece(s - start, min(s + max_columns, hi) - start, b, b if layerwise else 0))
    return out


@dataclasses.dataclass
class Basis:
    """P[:, S_r] and how it relates to the snapshots; how P is stored is ``storage``'s business.

    Weights are w = w_start + sum_{i,l} (theta - theta0)[i, l] * P_{i,l}: at theta = theta0
    the model is exactly at the start point in every precision.
    """
    num_coef_blocks: int            # L (1 in global mode)
    k: int                          # number of directions
    M: torch.Tensor                 # L x k x n float64: P_l = M_l X_l
    theta0: torch.Tensor            # k x L float64: coordinates of the start point
    alpha_start: torch.Tensor       # n float64: w_start = sum alpha_start_i w_i
    w_start: torch.Tensor           # d_r fp32
    storage: PStorage
    bits: int
    report: dict

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """c[i, l] = sum over this slice's columns of block l of P[i, j] g[j]  (k x L)."""
        return self.storage.project(g)

    def reconstruct(self, theta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """w[S_r] = w_start + Pᵀ (theta - theta0) per block, written into ``out``."""
        if out is None:
            out = torch.empty_like(self.w_start)
        return self.storage.reconstruct(self.w_start, theta, self.theta0, out)

    def alpha(self, theta: torch.Tensor) -> torch.Tensor:
        """Averaging weights A (n x L): block l of w is sum_i A[i, l] w_{i,l}.

        Exact for fp32 P; for quantised P it is the weighting of the unquantised directions.
        """
        delta = (theta.detach().double() - self.theta0.double())
        return self.alpha_start.unsqueeze(1) + torch.einsum("lkn,kl->nl", self.M, delta)

    def dequantized(self) -> torch.Tensor:
        """The effective P[:, S_r] (k x d fp32) whatever the storage, for checks."""
        return self.storage.dequantize()

    def max_error(self) -> torch.Tensor:
        """Per-entry quantisation bound (k x d): |P_stored - P| <= bound."""
        return self.storage.max_error()

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes


def build_basis(local: torch.Tensor, start: int, stop: int, blocks: Sequence[tuple[int, int]], *,
                directions: str = "raw", layerwise: bool = False, bits: int = 32,
                alpha_start: torch.Tensor | None = None, reduce: Reduce = identity_reduce,
                tol: float = 1e-5, spread_tol: float = 0.0, max_columns: int = CHUNK_COLUMNS,
                granularity: str = "row-block", kernels: Kernels | None = None) -> Basis:
    """Build this rank's P[:, S_r] from its snapshot slice ``local`` (n x d_r fp32).

    - global coefficients: an orthonormal basis (Cholesky-QR twice) of the raw or
      centred snapshots (the paper's Gram-Schmidt basis, in its order). A snapshot is dropped when
      its residual after the earlier ones is <= ``tol`` x its own norm (numerically dependent) or
      <= ``spread_tol`` x the trajectory's spread (:func:`trajectory_spread`): a near-duplicate
      (snapshots after convergence) adds a direction the trajectory barely explored, along which the
      fit is free to move tens of times further than SGD ever did (coefficients of -64 seen), so it
      is left out at the source rather than left to the optimiser;
    - layer-wise: each (direction, block) normalised to unit norm (the journal's
      per-layer coefficients); zero blocks get a zero direction, never NaN.
    ``blocks`` are the layer blocks over [0, D); ``alpha_start`` the start point as
    snapshot weights (default: uniform, the SWA mean).
    Collective calls: one n x n all-reduce (+ k x k, or n x L for layer-wise).
    Raises ValueError when the snapshots span fewer than 2 dimensions.
    """
    if directions not in ("raw", "centered"):
        raise ValueError(f"--directions must be raw or centered, got {directions!r}")
    if bits not in (32, 16) and not 1 <= bits <= 8:
        raise ValueError(f"--p-bits must be 32, 16 or 1..8, got {bits}")
    n, d = local.shape
    dev = local.device
    if alpha_start is None:
        alpha_start = torch.full((n,), 1.0 / n, dtype=torch.float64)
    alpha_start = alpha_start.double().to(dev)
    pieces = local_pieces(blocks, start, stop, layerwise, max_columns)
    g = gram(local, reduce)
    eye = torch.eye(n, dtype=torch.float64, device=dev)
    raw = sequential_cholesky(g, tol)
    rank_raw = len(raw[1])
    spread = trajectory_spread(g)
    report = {"n": n, "rank_raw": rank_raw, "residuals_raw": [round(x, 9) for x in raw[2]], "tol": tol,
              "spread": round(spread, 9), "spread_tol": spread_tol}
    if rank_raw <= 1:
        raise ValueError(f"the {n} selected snapshots span a space of dimension {rank_raw} "
                         f"(relative residuals {report['residuals_raw']}); TWA needs at least 2 "
                         "independent snapshots - are they identical?")
    combo = eye if directions == "raw" else eye - 1.0 / n
    # the start point in float64, rounded once: --epochs 0 then returns the SWA mean exactly
    w_start = torch.empty(d, dtype=torch.float32, device=dev)
    uniform = bool((alpha_start == alpha_start[0]).all())
    for c0 in range(0, d, max_columns):
        chunk = local[:, c0:c0 + max_columns].double()
        # uniform weights as sum / n: the same rounding as the natural SWA reference mean(0)
        w_start[c0:c0 + max_columns] = (chunk.sum(0) / n if uniform else alpha_start @ chunk).float()
    a_dir = alpha_start if directions == "raw" else alpha_start - 1.0 / n

    if not layerwise:
        res = orthonormalize(local, combo, reduce=reduce, tol=tol, floor=spread_tol * spread, g=g)
        q, m = res["Q"], res["M"]
        k = q.shape[0]
        if k == 0:
            raise ValueError("no independent direction left after centring: the snapshots are identical")
        theta0 = (m @ g @ a_dir).unsqueeze(1)  # coordinates of (w_start - base) on Q
        # near-duplicates: dropped by the spread floor although numerically independent
        near = [i for i in res["dropped"] if res["residuals"][i] > tol]
        report.update(kept=res["kept"], dropped=res["dropped"], near_duplicates=near,
                      residuals=[round(x, 9) for x in res["residuals"]])
        num_l, m_all = 1, m.unsqueeze(0)
    else:
        num_l = len(blocks)
        k = n
        v = _apply(combo, local) if directions == "centered" else local.clone()
        norms2 = torch.zeros(n, num_l, dtype=torch.float64, device=dev)
        for p in pieces:
            norms2[:, p.block] += v[:, p.lo:p.hi].double().pow(2).sum(1)
        norms2 = reduce(norms2)
        norms = norms2.sqrt()
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        for p in pieces:
            v[:, p.lo:p.hi] *= inv[:, p.block].float().unsqueeze(1)
        q = v
        theta0 = a_dir.unsqueeze(1) * norms                   # exact: w_start - base = sum a_i w_i per block
        m_all = inv.T.unsqueeze(2) * combo.unsqueeze(0)         # M_l = diag(1/norm_l) combo
        zero_blocks = int((norms == 0).sum())
        report.update(kept=list(range(n)), dropped=[], zero_blocks=zero_blocks)
    report.update(k=k, num_coef_blocks=num_l, directions=directions, bits=bits)

    spans = [(p.lo, p.hi, p.block, p.coef) for p in pieces]
    storage = build_storage(q, spans, len(blocks), bits=bits, num_coef=num_l, reduce=reduce,
                            granularity=granularity, kernels=kernels)
    if bits < 16:
        report.update(quant_granularity=granularity)
    return Basis(num_coef_blocks=num_l, k=k, M=m_all, theta0=theta0, alpha_start=alpha_start, w_start=w_start,
                 storage=storage, bits=bits, report=report)


# --- a basis that grows one snapshot at a time (paper mode) ----------------------------------
class GrowingBasis:
    """Paper mode's basis over snapshots that arrive one by one (a follower of a live run).

    Keeps this rank's snapshot slices X (n x d_r), the float64 Gram matrix and the first
    Cholesky-QR pass (R, M), so appending snapshot n+1 costs its inner products with the
    n others, O(n * d_r), one all-reduce of n+1 floats, and one new row of P (O(n * d_r)):
    nothing is rebuilt. The directions are the sequential Gram-Schmidt ones, as
    :func:`build_basis` gives from scratch (there with a second re-orthogonalisation
    pass; the two agree to about 1e-7). Start point: the SWA mean of all snapshots.
    ``spread_tol`` measures a new snapshot's residual against the spread of the snapshots so far
    (a snapshot kept early is never dropped later, when the spread has grown).
    """

    def __init__(self, start: int, stop: int, *, reduce: Reduce = identity_reduce, tol: float = 1e-5,
                 spread_tol: float = 0.0, device: torch.device | None = None):
        self.start, self.stop, self.reduce, self.tol, self.spread_tol = start, stop, reduce, tol, spread_tol
        self.device = device or torch.device("cpu")
        d = stop - start
        self.x = torch.empty(0, d, dtype=torch.float32, device=self.device)
        self.g = torch.zeros(0, 0, dtype=torch.float64, device=self.device)
        self.r = torch.zeros(0, 0, dtype=torch.float64, device=self.device)
        self.m = torch.zeros(0, 0, dtype=torch.float64, device=self.device)   # k x n: Q = M X
        self.q = torch.empty(0, d, dtype=torch.float32, device=self.device)
        self.kept: list[int] = []
        self.near_duplicates: list[int] = []
        self.residuals: list[float] = []
        self.sum = torch.zeros(d, dtype=torch.float64, device=self.device)    # for the SWA mean

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def append(self, x_new: torch.Tensor) -> bool:
        """Add snapshot slice ``x_new`` (d_r); returns False when it was dropped as nearly dependent."""
        x_new = x_new.to(self.device, torch.float32).reshape(1, -1)
        n = self.n
        col = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        for s in range(0, x_new.shape[1], CHUNK_COLUMNS):
            v = x_new[0, s:s + CHUNK_COLUMNS].double()
            if n:
                col[:n] += self.x[:, s:s + CHUNK_COLUMNS].double() @ v
            col[n] += v @ v
        col = self.reduce(col)  # the one collective: n + 1 floats
        g = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=self.device)
        g[:n, :n], g[n, :], g[:, n] = self.g, col, col
        self.g = g
        self.x = torch.cat([self.x, x_new])
        self.sum += x_new[0].double()
        self.m = torch.nn.functional.pad(self.m, (0, 1))
        # one step of sequential_cholesky: the new vector's coordinates on the kept directions
        k = len(self.kept)
        coord = (torch.linalg.solve_triangular(self.r.T, col[self.kept].unsqueeze(1), upper=False).squeeze(1)
                 if k else col.new_zeros(0))
        norm2 = float(col[n])
        resid2 = norm2 - float(coord @ coord)
        frac = math.sqrt(max(resid2, 0.0) / norm2) if norm2 > 0 else 0.0
        self.residuals.append(frac)
        if frac <= self.tol:
            return False
        if self.spread_tol and math.sqrt(max(resid2, 0.0)) <= self.spread_tol * trajectory_spread(g):
            self.near_duplicates.append(n)
            return False
        rk = math.sqrt(resid2)
        grown = g.new_zeros(k + 1, k + 1)
        grown[:k, :k], grown[:k, k], grown[k, k] = self.r, coord, rk
        self.r = grown
        # q_new = (x_new - sum_j coord_j q_j) / r: as a combination of the snapshots, then one row of P
        row = -(coord @ self.m) if k else g.new_zeros(n + 1)
        row[n] += 1.0
        row /= rk
        self.m = torch.cat([self.m, row.unsqueeze(0)])
        q_new = torch.empty(1, x_new.shape[1], dtype=torch.float32, device=self.device)
        for s in range(0, x_new.shape[1], CHUNK_COLUMNS):
            q_new[0, s:s + CHUNK_COLUMNS] = (row @ self.x[:, s:s + CHUNK_COLUMNS].double()).float()
        self.q = torch.cat([self.q, q_new])
        self.kept.append(n)
        return True

    def basis(self) -> Basis:
        """The current fp32 basis (paper mode: raw directions, global coefficients, SWA start)."""
        n = self.n
        if len(self.kept) < 2:
            raise ValueError(f"the {n} snapshots so far span a space of dimension {len(self.kept)}; "
                             "TWA needs at least 2 independent snapshots")
        alpha = torch.full((n,), 1.0 / n, dtype=torch.float64, device=self.device)
        theta0 = (self.m @ self.g @ alpha).unsqueeze(1)
        dropped = [i for i in range(n) if i not in self.kept]
        report = {"n": n, "k": len(self.kept), "kept": list(self.kept), "dropped": dropped,
                  "near_duplicates": list(self.near_duplicates), "spread": round(trajectory_spread(self.g), 9),
                  "spread_tol": self.spread_tol,
                  "residuals": [round(r, 9) for r in self.residuals], "tol": self.tol, "num_coef_blocks": 1,
                  "directions": "raw", "bits": 32, "incremental": True}
        return Basis(num_coef_blocks=1, k=len(self.kept), M=self.m.unsqueeze(0), theta0=theta0, alpha_start=alpha,
                     w_start=(self.sum / n).float(), storage=DenseP(self.q), bits=32, report=report)
