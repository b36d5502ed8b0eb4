"""How a rank stores P[:, S_r]: one ``PStorage`` interface, three implementations.

- :class:`DenseP`: fp32 or fp16 rows (paper mode).
- :class:`GroupedP`: 1/2/4/8-bit codes packed in tiles of 64 bytes, group-major, one
  min/max range per (direction, block) or per block (``granularity``). The fused
  kernels read the packed bytes once and never materialise P in fp32.
- :class:`RowQuantP`: any bit width 1..8 per piece of columns (3, 5, 6, 7 bits land here).

Kernels are chosen once, at build time (:func:`resolve_kernels`), from the device and
the ``TWA_SCALE_P_KERNEL`` knob: ``native`` (a small C kernel built with the system
compiler, AVX-512 or AVX2 when the CPU has it), ``compile`` (torch.compile: Triton on GPU, Inductor
C++ on CPU) or ``eager`` (chunked dequantise + BLAS). ``auto`` picks native on CPU when
a compiler is there, compile on CUDA, eager otherwise. Every path computes the same
products as :meth:`PStorage.dequantize` to fp32 rounding (tests pin 1e-5 relative).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

import torch

from twa_scale import knobs

__all__ = ["PStorage", "DenseP", "GroupedP", "RowQuantP", "QuantizedRows", "Kernels", "resolve_kernels",
           "build_storage", "pack_bits", "unpack_bits", "pack_tiles", "unpack_tiles", "quantize_rows",
           "TILE_BYTES", "GRANULARITIES"]

TILE_BYTES = 64             # one packed tile: 64 bytes of each row = 64 * 8 / bits columns
GRANULARITIES = ("row-block", "block")


def _delta(theta: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """The reconstruct's coefficients: theta - theta0 in float64 (they are few), the wide product in fp32."""
    return (theta.detach().double() - theta0).to(torch.float32)


class PStorage(Protocol):
    """P[:, S_r] (k x d) in some precision; ``coef`` maps columns to coefficient blocks (L of them)."""

    k: int

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """c[i, l] = sum over this slice's columns j of block l of P[i, j] g[j]  (k x L fp32)."""

    def reconstruct(self, w_start: torch.Tensor, theta: torch.Tensor, theta0: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """out = w_start + sum_l P_lᵀ delta[:, l], delta = theta - theta0 (k x L float64) rounded to fp32."""

    def dequantize(self) -> torch.Tensor:
        """The effective P (k x d fp32), for checks."""

    def max_error(self) -> torch.Tensor:
        """Per-entry bound (k x d) on |P_stored - P|."""

    @property
    def nbytes(self) -> int:
        """Bytes this rank holds for P."""


# --- kernel choice, resolved once ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kernels:
    """How the packed products run: ``path`` in native | compile | eager, and the eager chunk."""
    path: str
    chunk_columns: int

    @property
    def describe(self) -> str:
        return self.path


def resolve_kernels(device: torch.device, compile: bool | None = None) -> Kernels:
    """The kernel path for packed P on ``device``: knob TWA_SCALE_P_KERNEL, else ``compile``
    (True: torch.compile, False: eager), else auto (native C on CPU if it builds, compile on CUDA)."""
    choice = knobs.p_kernel()
    chunk = knobs.p_chunk_columns()
    if choice == "auto":
        if compile is True:
            choice = "compile"
        elif compile is False:
            choice = "eager"
        else:
            choice = "native" if device.type == "cpu" else "compile"
    if choice == "native" and (device.type != "cpu" or _native() is None):
        choice = "compile" if device.type == "cuda" else "eager"
    return Kernels(choice, chunk)


# --- bit packing ------------------------------------------------------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dim; 8 codes -> ``bits`` bytes.

    The last dimension is zero-padded to a multiple of 8 first.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, d = values.shape
    pad = (-d) % 8
    v = values.to(torch.uint8)
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    if bits == 8:
        return v.contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        v = v.reshape(*lead, -1, per).to(torch.int32)
        shifts = torch.arange(per, device=v.device, dtype=torch.int32) * bits
        return (v << shifts).sum(-1).to(torch.uint8)
    # 3, 5, 6, 7 bits: 8 codes make a 64-bit word of which `bits` bytes are used
    v = v.reshape(*lead, -1, 8).to(torch.int64)
    word = (v << (torch.arange(8, device=v.device, dtype=torch.int64) * bits)).sum(-1)
    byte_shifts = torch.arange(bits, device=v.device, dtype=torch.int64) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes with last dimension ``d``."""
    *lead, nb = packed.shape
    if bits == 8:
        return packed[..., :d]
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        v = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return v.reshape(*lead, nb * per)[..., :d]
    b = packed.reshape(*lead, -1, bits).to(torch.int64)
    word = (b << (torch.arange(bits, device=packed.device, dtype=torch.int64) * 8)).sum(-1)
    v = (word.unsqueeze(-1) >> (torch.arange(8, device=packed.device, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return v.to(torch.uint8).reshape(*lead, -1)[..., :d]


def pack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., G) with G = 64 * 8 / bits -> (..., 64) bytes in "dword-planar" order: the tile is
    two halves of eight little-endian 32-bit words; column h * G/2 + 8 * pos + lane sits in word
    (h, lane) at bit ``pos * bits``.

    A kernel loads eight words (32 bytes) and gets eight consecutive columns of position ``pos``
    with one AND: the code times 2^(pos * bits), which converts to float exactly, so the power of
    two is folded into g (project) or into the final store (reconstruct), never shifted out.
    """
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], 2, 4, per, 8)            # half, byte, plane, lane
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).unsqueeze(1)
    byte = (c << shifts).sum(-2).to(torch.uint8)                                  # half, byte, lane
    return byte.transpose(-1, -2).reshape(*codes.shape[:-1], TILE_BYTES)


def unpack_tiles(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_tiles`: (..., 64) bytes -> (..., G) int32 codes."""
    per, mask = 8 // bits, (1 << bits) - 1
    x = packed.to(torch.int32).reshape(*packed.shape[:-1], 2, 8, 4).transpose(-1, -2)   # half, byte, lane
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).view(per, 1)
    v = (x.unsqueeze(-2) >> shifts) & mask                                        # half, byte, plane, lane
    return v.reshape(*packed.shape[:-1], per * TILE_BYTES)


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _codes(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - lo) / safe).clamp_(0, _levels(bits))


def _bound(lo: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Half a quantisation step, plus the fp32 rounding of lo + scale * code."""
    return scale / 2 + 1e-6 * (lo.abs() + scale * _levels(bits))


# --- dense ------------------------------------------------------------------------------------
@dataclasses.dataclass
class DenseP:
    """fp32 or fp16 rows; ``col_coef`` (L > 1 only) lists (lo, hi, coef) column runs."""
    rows: torch.Tensor                       # k x d
    num_coef: int = 1
    runs: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)

    @property
    def k(self) -> int:
        return self.rows.shape[0]

    def project(self, g: torch.Tensor) -> torch.Tensor:
        if self.num_coef == 1 and self.rows.dtype == torch.float32:
            return torch.mv(self.rows, g).unsqueeze(1)
        out = torch.zeros(self.k, self.num_coef, dtype=torch.float32, device=g.device)
        for lo, hi, l in self.runs:
            out[:, l] += torch.mv(self.rows[:, lo:hi].to(g.dtype), g[lo:hi])
        return out

    def reconstruct(self, w_start: torch.Tensor, theta: torch.Tensor, theta0: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        delta = _delta(theta, theta0)
        if self.num_coef == 1 and self.rows.dtype == torch.float32:
            return torch.addmv(w_start, self.rows.T, delta[:, 0], out=out)
        out.copy_(w_start)
        for lo, hi, l in self.runs:
            out[lo:hi].addmv_(self.rows[:, lo:hi].to(out.dtype).T, delta[:, l])
        return out

    def dequantize(self) -> torch.Tensor:
        return self.rows.float()

    def max_error(self) -> torch.Tensor:
        return torch.zeros(self.rows.shape, dtype=torch.float32, device=self.rows.device)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


# --- per-piece quantised rows (any bit width) ---------------------------------------------------
@dataclasses.dataclass
class QuantizedRows:
    """k rows of one column piece, per-row min/max uniform codes of ``bits`` bits."""
    packed: torch.Tensor   # k x ceil(d*bits/8) uint8
    lo: torch.Tensor       # k fp32
    scale: torch.Tensor    # k fp32; value = lo + scale * code
    bits: int
    d: int

    def dequantize(self) -> torch.Tensor:
        codes = unpack_bits(self.packed, self.bits, self.d).to(self.lo.dtype)
        return torch.addcmul(self.lo.unsqueeze(1), codes, self.scale.unsqueeze(1))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 8 * self.lo.numel()

    def max_error(self) -> torch.Tensor:
        """Per-row bound."""
        return _bound(self.lo, self.scale, self.bits)


def quantize_rows(x: torch.Tensor, bits: int, lo: torch.Tensor | None = None,
                  hi: torch.Tensor | None = None) -> QuantizedRows:
    """Min/max uniform quantisation of each row of ``x`` (k x d) to ``bits`` bits.

    ``lo``/``hi`` default to this piece's row min/max; the caller passes the
    per-(snapshot, block) range when a block is split over several pieces.
    """
    lo = x.amin(1) if lo is None else lo
    hi = x.amax(1) if hi is None else hi
    scale = (hi - lo) / _levels(bits)
    codes = _codes(x, lo.unsqueeze(1), scale.unsqueeze(1), bits)
    return QuantizedRows(pack_bits(codes, bits), lo.float().clone(), scale.float().clone(), bits, x.shape[1])


@dataclasses.dataclass
class RowQuantP:
    """One :class:`QuantizedRows` per piece (lo, hi, coef): products dequantise a piece at a time."""
    pieces: list[QuantizedRows]
    spans: list[tuple[int, int, int]]        # (lo, hi, coef) of each piece
    num_coef: int

    @property
    def k(self) -> int:
        return self.pieces[0].packed.shape[0] if self.pieces else 0

    def project(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.k, self.num_coef, dtype=torch.float32, device=g.device)
        for q, (lo, hi, l) in zip(self.pieces, self.spans):
            out[:, l] += torch.mv(q.dequantize(), g[lo:hi])
        return out

    def reconstruct(self, w_start: torch.Tensor, theta: torch.Tensor, theta0: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        delta = _delta(theta, theta0)
        out.copy_(w_start)
        for q, (lo, hi, l) in zip(self.pieces, self.spans):
            out[lo:hi].addmv_(q.dequantize().T, delta[:, l])
        return out

    def dequantize(self) -> torch.Tensor:
        return torch.cat([q.dequantize() for q in self.pieces], 1)

    def max_error(self) -> torch.Tensor:
        return torch.cat([q.max_error().unsqueeze(1).expand(-1, q.d) for q in self.pieces], 1)

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.pieces)


# --- grouped, packed in tiles (1/2/4/8 bits) ----------------------------------------------------
def _grouped_project(packed, gstart, pid, coef, scale, lo, g, bits: int, num_coef: int, out):
    """Reference/compilable form: out (k x L) += per group (scale * codes + lo) . g."""
    ng, k, tile = packed.shape
    per = 8 // bits
    cols = gstart.unsqueeze(1) + torch.arange(per * tile, device=g.device)        # ng x G
    gg = g[cols]                                                                 # ng x G
    codes = unpack_tiles(packed, bits).float()                                   # ng x k x G
    dots = (codes * gg.unsqueeze(1)).sum(2)                                      # ng x k
    contrib = dots * scale.T[pid] + lo.T[pid] * gg.sum(1, keepdim=True)          # ng x k
    if num_coef == 1:
        out[:, 0] += contrib.sum(0)
    else:
        out.T.index_add_(0, coef[pid], contrib)
    return out


def _grouped_reconstruct(packed, gstart, pid, a, b, w, out, bits: int):
    """out[group columns] = w + codesᵀ a[:, pid] + b[pid] (a = scale * delta, b = sum lo * delta)."""
    ng, k, tile = packed.shape
    per = 8 // bits
    cols = (gstart.unsqueeze(1) + torch.arange(per * tile, device=w.device)).reshape(-1)
    codes = unpack_tiles(packed, bits).float()                                   # ng x k x G
    val = (codes * a.T[pid].unsqueeze(2)).sum(1) + b[pid].unsqueeze(1)           # ng x G
    out[cols] = w[cols] + val.reshape(-1)
    return out


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    if name not in _COMPILED:
        fn = {"project": _grouped_project, "reconstruct": _grouped_reconstruct}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


@dataclasses.dataclass(frozen=True)
class GroupedP:
    """P[:, S_r] as tiles: group m covers columns [gstart_m, gstart_m + G) inside one block,
    stored as a (k x 64)-byte tile (all rows' codes of the group side by side, so a kernel
    reads a group's bytes contiguously while the group's slice of g stays in L1). Columns
    not in a full group inside one block (block edges, tails, small tensors) are quantised
    the same way but kept dequantised in a small fp32 side matrix."""
    packed: torch.Tensor      # ng x k x 64 uint8
    gstart: torch.Tensor      # ng int64: first column of each group
    pid: torch.Tensor         # ng int64: local block of each group
    coef: torch.Tensor        # nb int64: coefficient column of each local block
    lo: torch.Tensor          # k x nb fp32
    scale: torch.Tensor       # k x nb fp32
    side_idx: torch.Tensor    # int64 columns kept in fp32
    side_blk: torch.Tensor    # int64 local block of each side column
    side: torch.Tensor        # k x len(side_idx) fp32 (after init: a view of side_t)
    bits: int
    d: int
    num_coef: int
    kernels: Kernels
    side_coef: torch.Tensor = dataclasses.field(init=False)   # coefficient column of each side column
    side_t: torch.Tensor = dataclasses.field(init=False)      # side transposed (len(side_idx) x k)

    def __post_init__(self):
        # resolved once: gathering it from side_blk at every step cost more than the side product itself
        object.__setattr__(self, "side_coef", self.coef[self.side_blk])
        # the native kernels read each side column's k rows at once; side becomes a view of it (one copy kept)
        object.__setattr__(self, "side_t", self.side.T.contiguous())
        object.__setattr__(self, "side", self.side_t.T)
        if self.kernels.path == "native":
            # the native kernels' fixed arguments, resolved once (the class is frozen, so they stay valid): after
            # a forward and backward pass each Python-level call costs tens of µs
            object.__setattr__(self, "_native_args", tuple(_ptrs(
                self.side_t, self.side_idx, self.side_coef, self.packed, self.gstart, self.pid, self.coef, self.scale,
                self.lo)))
            # side columns, groups, rows, blocks, coefficient columns, bits
            object.__setattr__(self, "_native_sizes", (self.side_idx.numel(), self.gstart.numel(), self.k,
                                                       self.scale.shape[1], self.num_coef, self.bits))

    @property
    def k(self) -> int:
        return self.side.shape[0]

    @property
    def group_columns(self) -> int:
        return TILE_BYTES * 8 // self.bits

    @property
    def nbytes(self) -> int:
        return (self.packed.numel() + 8 * (self.gstart.numel() + self.pid.numel())
                + 4 * (self.lo.numel() + self.scale.numel() + self.side.numel()) + 16 * self.side_idx.numel())

    @classmethod
    def build(cls, q: torch.Tensor, spans: Sequence[tuple[int, int, int, int]], lo_blk: torch.Tensor,
              hi_blk: torch.Tensor, bits: int, num_coef: int, kernels: Kernels) -> "GroupedP":
        """``spans``: (lo, hi, block, coef) column runs of this slice; ranges per global block."""
        k, d = q.shape
        dev = q.device
        gsize = TILE_BYTES * 8 // bits
        used = sorted({s[2] for s in spans})
        local = {b: i for i, b in enumerate(used)}
        coef_of = torch.zeros(len(used), dtype=torch.int64, device=dev)
        for _, _, b, c in spans:
            coef_of[local[b]] = c
        lo = lo_blk[:, used].float().contiguous()
        scale = ((hi_blk[:, used] - lo_blk[:, used]) / _levels(bits)).float().contiguous()
        # a block's columns inside this slice are contiguous: merge its spans, cut full groups
        runs: dict[int, list[int]] = {}
        for a, e, b, _ in spans:
            r = runs.setdefault(local[b], [a, e])
            r[0], r[1] = min(r[0], a), max(r[1], e)
        starts, pids, side_cols, side_blks = [], [], [], []
        for b, (a, e) in sorted(runs.items(), key=lambda kv: kv[1][0]):
            full = (e - a) // gsize
            starts.append(torch.arange(full, device=dev) * gsize + a)
            pids.append(torch.full((full,), b, dtype=torch.int64, device=dev))
            side_cols.append(torch.arange(a + full * gsize, e, device=dev))
            side_blks.append(torch.full((e - a - full * gsize,), b, dtype=torch.int64, device=dev))
        gstart = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.int64, device=dev)
        pid = torch.cat(pids) if pids else torch.zeros(0, dtype=torch.int64, device=dev)
        side_idx = torch.cat(side_cols) if side_cols else torch.zeros(0, dtype=torch.int64, device=dev)
        side_blk = torch.cat(side_blks) if side_blks else torch.zeros(0, dtype=torch.int64, device=dev)
        ng = gstart.numel()
        packed = torch.empty(ng, k, TILE_BYTES, dtype=torch.uint8, device=dev)
        step = max(1, (1 << 16) // gsize)
        offs = torch.arange(gsize, device=dev)
        for g0 in range(0, ng, step):
            g1 = min(g0 + step, ng)
            cols = gstart[g0:g1].unsqueeze(1) + offs                                   # m x G
            p = pid[g0:g1]
            x = q[:, cols]                                                             # k x m x G
            codes = _codes(x, lo[:, p].unsqueeze(2), scale[:, p].unsqueeze(2), bits)
            packed[g0:g1] = pack_tiles(codes.permute(1, 0, 2), bits)
        codes = _codes(q[:, side_idx], lo[:, side_blk], scale[:, side_blk], bits)
        side = lo[:, side_blk] + scale[:, side_blk] * codes
        return cls(packed, gstart, pid, coef_of, lo, scale, side_idx, side_blk, side.contiguous(), bits, d,
                   num_coef, kernels)

    # -- products ---------------------------------------------------------------------------
    def project(self, g: torch.Tensor) -> torch.Tensor:
        path = self.kernels.path
        if path == "native":   # side columns and groups in one C call
            _check_length("g", g, self.d)   # C reads d entries of it
            c = torch.empty(self.k, self.num_coef, dtype=torch.float32)
            if _native().twa_project(*self._native_args, *_ptrs(g, c), *self._native_sizes):
                raise MemoryError(f"native TWA project: no memory for the partial sums of {self.k} rows")
            return c
        out = torch.zeros(self.k, self.num_coef, dtype=torch.float32, device=g.device)
        if self.side_idx.numel():
            gs = g[self.side_idx]
            if self.num_coef == 1:
                out[:, 0] += torch.mv(self.side, gs)
            else:
                out.T.index_add_(0, self.side_coef, (self.side * gs).T)
        if not self.gstart.numel():
            return out
        if path == "compile":
            return _compiled("project")(self.packed, self.gstart, self.pid, self.coef, self.scale, self.lo, g,
                                        self.bits, self.num_coef, out)
        step = max(1, self.kernels.chunk_columns // self.group_columns)
        for g0 in range(0, self.gstart.numel(), step):
            sl = slice(g0, g0 + step)
            _grouped_project(self.packed[sl], self.gstart[sl], self.pid[sl], self.coef, self.scale, self.lo, g,
                             self.bits, self.num_coef, out)
        return out

    def reconstruct(self, w_start: torch.Tensor, theta: torch.Tensor, theta0: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        path = self.kernels.path
        if path == "native":   # delta, per-block factors, side columns and groups in one C call
            if theta.dtype != torch.float64 or not theta.is_contiguous():
                theta = theta.detach().double().contiguous()
            if theta0.dtype != torch.float64 or not theta0.is_contiguous():
                theta0 = theta0.double().contiguous()
            if theta.shape != theta0.shape:
                raise ValueError(f"reconstruct: theta is {tuple(theta.shape)}, the basis has {tuple(theta0.shape)}")
            _check_length("w_start", w_start, self.d)   # C reads and writes d entries of these
            _check_length("out", out, self.d)
            if _native().twa_reconstruct(*self._native_args, *_ptrs(theta, theta0, w_start, out), *self._native_sizes):
                raise MemoryError(f"native TWA reconstruct: no memory for the factors of {self.k} rows")
            return out
        delta = _delta(theta, theta0)
        dcol = delta[:, self.coef]                                   # k x nb: each block's coefficient
        a = (self.scale * dcol).contiguous()
        b = (self.lo * dcol).sum(0)
        if self.side_idx.numel():
            ws = w_start[self.side_idx]
            if self.num_coef == 1:
                ws = torch.addmv(ws, self.side.T, delta[:, 0])
            else:
                ws += (self.side * delta[:, self.side_coef]).sum(0)
            out.index_copy_(0, self.side_idx, ws)
        if not self.gstart.numel():
            return out
        if path == "compile":
            return _compiled("reconstruct")(self.packed, self.gstart, self.pid, a, b, w_start, out, self.bits)
        step = max(1, self.kernels.chunk_columns // self.group_columns)
        for g0 in range(0, self.gstart.numel(), step):
            sl = slice(g0, g0 + step)
            _grouped_reconstruct(self.packed[sl], self.gstart[sl], self.pid[sl], a, b, w_start, out, self.bits)
        return out

    # -- checks -----------------------------------------------------------------------------
    def _per_column(self, fill_group, fill_side) -> torch.Tensor:
        out = torch.empty(self.k, self.d, dtype=torch.float32, device=self.packed.device)
        if self.gstart.numel():
            cols = (self.gstart.unsqueeze(1) + torch.arange(self.group_columns, device=out.device)).reshape(-1)
            out[:, cols] = fill_group().permute(1, 0, 2).reshape(self.k, -1)
        out[:, self.side_idx] = fill_side()
        return out

    def dequantize(self) -> torch.Tensor:
        def groups():
            codes = unpack_tiles(self.packed, self.bits).float()                 # ng x k x G
            return codes * self.scale.T[self.pid].unsqueeze(2) + self.lo.T[self.pid].unsqueeze(2)
        return self._per_column(groups, lambda: self.side)

    def max_error(self) -> torch.Tensor:
        bound = _bound(self.lo, self.scale, self.bits)                            # k x nb
        gsize = self.group_columns
        return self._per_column(lambda: bound.T[self.pid].unsqueeze(2).expand(-1, -1, gsize),
                                lambda: bound[:, self.side_blk])


# --- the native C kernel -------------------------------------------------------------------------
def _native_source() -> str:
    """The C source of the packed-P kernels, shipped beside this module as package data."""
    from importlib.resources import files

    return files("twa_scale.twa").joinpath("quant_kernel.c").read_text()


_NATIVE_LIB: list = []


def _native():
    """The C kernels for this CPU, built once per source version with the system compiler; None when none
    is found."""
    if not _NATIVE_LIB:
        _NATIVE_LIB.append(build_native("native"))
    return _NATIVE_LIB[0]


def native_simd_bits() -> int | None:
    """The vector width the native kernels run at on this CPU: 512 (AVX-512), 256 (AVX2), 0 (scalar); None when
    they did not build."""
    lib = _native()
    return None if lib is None else lib.twa_simd_bits()


def build_native(march: str):
    """The C kernels compiled with ``-march=<march>`` (tests build x86-64-v2/v3 to run the scalar and AVX2
    code on any x86-64 host), cached by source, compiler, flags; None when no compiler builds them."""
    import ctypes
    import hashlib
    import os
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    source = _native_source() if cc else ""
    cache = os.path.join(tempfile.gettempdir(), f"twa_scale_kernels-{os.getuid()}")
    # with OpenMP first (the kernels then run on torch's intra-op pool), else one thread
    for flags in ([f"-march={march}", "-fopenmp"], [f"-march={march}"]) if cc else ():
        key = hashlib.sha256((source + cc + " ".join(flags)).encode()).hexdigest()[:16]
        so = os.path.join(cache, f"twa_quant_{key}.so")
        try:
            if not os.path.exists(so):
                os.makedirs(cache, exist_ok=True)
                src = os.path.join(cache, f"twa_quant_{key}.c")
                with open(src, "w") as f:
                    f.write(source)
                tmp = f"{so}.{os.getpid()}"
                subprocess.run([cc, "-O3", "-shared", "-fPIC", *flags, "-o", tmp, src], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, so)   # atomic: ranks building at once never load a half-written file
            lib = ctypes.CDLL(so)
        except (OSError, subprocess.SubprocessError):
            continue
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.twa_project.argtypes = [p] * 11 + [i64] * 6
        lib.twa_reconstruct.argtypes = [p] * 13 + [i64] * 6
        lib.twa_project.restype = lib.twa_reconstruct.restype = ctypes.c_int
        lib.twa_kernel_threads.argtypes = [i64]
        lib.twa_simd_bits.argtypes = []
        return lib
    return None


def _check_length(name: str, t: torch.Tensor, d: int) -> None:
    if t.numel() != d:
        raise ValueError(f"native TWA kernels: {name} has {t.numel()} entries, this slice of P has {d} columns")


def _ptrs(*tensors: torch.Tensor) -> list[int]:
    for t in tensors:
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("native TWA kernels need contiguous CPU tensors")
    return [t.data_ptr() for t in tensors]


# --- building the storage of one basis -----------------------------------------------------------
def build_storage(q: torch.Tensor, spans: Sequence[tuple[int, int, int, int]], num_blocks: int, *, bits: int,
                  num_coef: int, reduce, granularity: str = "row-block",
                  kernels: Kernels | None = None) -> PStorage:
    """Store this rank's rows ``q`` (k x d fp32) in ``bits`` precision.

    ``spans`` are (lo, hi, block, coef) column runs of the slice. Quantisation ranges:
    ``row-block`` = one min/max per (direction, block) (finer than the journal);
    ``block`` = one min/max per block shared by all directions (the journal's). Ranges are
    all-reduced so every world size quantises a column identically. Collectives: two
    all-reduces of k x blocks floats (quantised P only).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"--quant-granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    runs = [(a, e, c) for a, e, _, c in spans]
    if bits == 32:
        return DenseP(q, num_coef, runs)
    if bits == 16:
        return DenseP(q.half(), num_coef, runs)
    k, dev = q.shape[0], q.device
    lo = torch.full((k, num_blocks), math.inf, dtype=torch.float32, device=dev)
    hi = torch.full((k, num_blocks), -math.inf, dtype=torch.float32, device=dev)
    for a, e, b, _ in spans:
        if e > a:
            lo[:, b] = torch.minimum(lo[:, b], q[:, a:e].amin(1))
            hi[:, b] = torch.maximum(hi[:, b], q[:, a:e].amax(1))
    lo, hi = reduce(lo, op="min"), reduce(hi, op="max")
    if granularity == "block":
        lo, hi = lo.amin(0, keepdim=True).expand(k, -1), hi.amax(0, keepdim=True).expand(k, -1)
    kernels = kernels or resolve_kernels(dev)
    if 8 % bits == 0:
        return GroupedP.build(q, spans, lo, hi, bits, num_coef, kernels)
    pieces = [quantize_rows(q[:, a:e], bits, lo[:, b], hi[:, b]) for a, e, b, _ in spans]
    return RowQuantP(pieces, runs, num_coef)
