"""Who orthogonalises which Muon matrix, and how its slices travel there and back.

Three exchanges with one interface, one per way the matrices are stored, chosen once (`Muon.attach`):
- `LocalExchange`: one process (or unattached): every matrix orthogonalised here;
- `ReplicatedExchange`: ZeRO-0 on several ranks, whole parameters everywhere;
- `PartitionExchange`: ZeRO 1-3, one flat partition per rank.
Each is built for a *unit* of storage (a group's parameters, or one flat partition) and offers
`pieces(tensors)`: the regions of the unit's tensors (or of tensors shaped like them: the
momentum) that are this rank's pieces of matrices, each with its matrix; and
`orthogonalise(updates, dtype, ns)`: the NS results for `pieces(updates)`, in that order. The
optimizer applies the update once, the same way for all three.

Newton–Schulz needs a whole matrix, while ZeRO leaves each rank a flat run of elements that may
start or end anywhere inside a matrix. Every matrix gets one *owner* rank (balancing NS cost over
the ranks); each rank sends the pieces it holds to their owners in one batched all_to_all, owners
run NS, and a second all_to_all brings each piece's result back to the rank that holds it, where
the update is applied to the local partition. Pieces held by their owner do not travel. Nobody
holds more than its partition plus the matrices it owns. At ZeRO-0 every rank holds everything:
owners orthogonalise, then one all_gather.

The plans are built once from the global layout (`zero_layout.partition_layout`), so every rank
knows every split size, and both sides of each exchange list pieces in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from modeconn.optim.newton_schulz import MatrixSlice, ns_multiply_adds
from modeconn.optim.zero_layout import Fragment

Orthogonalise = Callable[[torch.Tensor], torch.Tensor]
NSCost = Callable[[int, int], int]  # (rows, cols) -> the work of one matrix's NS, for balancing
Piece2D = tuple[torch.Tensor, MatrixSlice]  # a region of a unit's tensor, and the matrix it is (part of)


class Exchange(Protocol):
    matrices: list[MatrixSlice]

    @property
    def owned_matrices(self) -> list[MatrixSlice]: ...

    def pieces(self, tensors: list[Optional[torch.Tensor]]) -> list[Piece2D]: ...

    def orthogonalise(self, updates: list[Optional[torch.Tensor]], dtype: torch.dtype,
                      ns: Orthogonalise) -> Iterable[torch.Tensor]: ...


def _row_pieces(tensors: list[Optional[torch.Tensor]], slices: list[list[MatrixSlice]]) -> list[Piece2D]:
    """Each parameter's matrices as row ranges of it; a parameter given as None (no gradient) has none."""
    return [(t[m.row_start:m.row_end], m) for t, mine in zip(tensors, slices) if t is not None for m in mine]


class LocalExchange:
    """One process: every matrix of a group's parameters is orthogonalised here, one at a time
    (lazily, so that no more than one result is held)."""

    def __init__(self, slices: list[list[MatrixSlice]]):
        self.slices = slices
        self.matrices = [m for mine in slices for m in mine]

    @property
    def owned_matrices(self) -> list[MatrixSlice]:
        return self.matrices

    def pieces(self, tensors: list[Optional[torch.Tensor]]) -> list[Piece2D]:
        return _row_pieces(tensors, self.slices)

    def orthogonalise(self, updates, dtype, ns) -> Iterable[torch.Tensor]:
        return (ns(u) for u, _ in self.pieces(updates))


def assign_owners(matrices: list[MatrixSlice], world_size: int, held: Optional[list[dict[int, int]]] = None,
                  ns_cost: NSCost = ns_multiply_adds) -> list[int]:
    """Balance the NS cost over the ranks first, then keep each matrix where its elements already are.

    The greedy LPT schedule (largest cost first, each matrix to the least-loaded rank; within 4/3 of
    the best makespan) sets the bound M. With `held` (elements of matrix k on each rank), matrices are
    then packed largest first onto the rank holding most of them among those that stay within M
    (else the least-loaded); that packing is kept if it meets M, which is the usual case at ZeRO-1/2,
    where each rank holds a contiguous run of layers and hardly anything has to travel."""
    cost = [ns_cost(m.rows, m.cols) for m in matrices]
    order = sorted(range(len(matrices)), key=lambda k: (-cost[k], k))

    def schedule(prefer) -> tuple[list[int], int]:
        load, owners = [0] * world_size, [0] * len(matrices)
        for k in order:
            owners[k] = owner = min(range(world_size), key=lambda r: prefer(k, r, load))
            load[owner] += cost[k]
        return owners, max(load)

    balanced, makespan = schedule(lambda k, r, load: (load[r], r))
    if not held:
        return balanced

    def holder_within_bound(k, r, load):
        over = load[r] + cost[k] > makespan
        return over, 0 if over else -held[k].get(r, 0), load[r], r

    local, local_makespan = schedule(holder_within_bound)
    return local if local_makespan <= makespan else balanced


@dataclass(frozen=True)
class Piece:
    """The elements [start, start + numel) of matrix `matrix` (row-major), held by `rank` at
    `offset` in its flat partition."""
    rank: int
    matrix: int
    start: int
    numel: int
    offset: int


def matrix_pieces(matrices: list[MatrixSlice], fragments: list[Fragment]) -> list[Piece]:
    """Cut every rank's fragments at matrix boundaries."""
    by_param: dict[str, list[tuple[int, MatrixSlice]]] = {}
    for k, m in enumerate(matrices):
        by_param.setdefault(m.param, []).append((k, m))
    pieces = []
    for f in fragments:
        for k, m in by_param.get(f.name, ()):
            first, last = m.row_start * m.cols, m.row_end * m.cols
            lo, hi = max(f.start, first), min(f.start + f.numel, last)
            if lo < hi:
                pieces.append(Piece(f.rank, k, lo - first, hi - lo, f.offset + lo - f.start))
    return pieces


def _pack(dst: torch.Tensor, src: torch.Tensor, runs: Iterable[tuple[int, int]]) -> None:
    """Copy the runs (offset, numel) of `src`, in order, one after another into `dst`."""
    position = 0
    for at, numel in runs:
        dst.narrow(0, position, numel).copy_(src.narrow(0, at, numel))
        position += numel


def _unpack(dst: torch.Tensor, src: torch.Tensor, runs: Iterable[tuple[int, int]]) -> None:
    """The inverse of `_pack`: consecutive elements of `src` into the runs (offset, numel) of `dst`."""
    position = 0
    for at, numel in runs:
        dst.narrow(0, at, numel).copy_(src.narrow(0, position, numel))
        position += numel


class PartitionExchange:
    """One flat partition's Muon matrices (a ZeRO parameter group, or a ZeRO-3 sub-group), as seen
    from `rank`: what it sends to whom, what it owns, what comes back."""

    def __init__(self, matrices: list[MatrixSlice], pieces: list[Piece], rank: int, world_size: int, group=None,
                 ns_cost: NSCost = ns_multiply_adds):
        covered = [0] * len(matrices)
        held: list[dict[int, int]] = [{} for _ in matrices]
        for p in pieces:
            covered[p.matrix] += p.numel
            held[p.matrix][p.rank] = held[p.matrix].get(p.rank, 0) + p.numel
        for m, n in zip(matrices, covered):
            if n != m.rows * m.cols:
                raise RuntimeError(f"Muon: the ZeRO fragments of {m.param} rows {m.row_start}:{m.row_end} cover "
                                   f"{n} of its {m.rows * m.cols} elements")
        self.matrices, self.group = matrices, group
        self.owners = assign_owners(matrices, world_size, held, ns_cost)
        self.owned: list[tuple[int, int]] = []  # (matrix, offset in the owned buffer)
        offset = 0
        for k, m in enumerate(matrices):
            if self.owners[k] == rank:
                self.owned.append((k, offset))
                offset += m.rows * m.cols
        self.owned_numel = offset
        where = dict(self.owned)
        # Pieces a rank holds of the matrices it owns stay put (`kept`); the rest travel. Sent in
        # (owner, matrix, start) order; the receiver lists what it gets in (sender, matrix, start)
        # order: both sort each sender-owner pair's pieces by (matrix, start).
        self.local = sorted((p for p in pieces if p.rank == rank), key=lambda p: (self.owners[p.matrix], p.matrix, p.start))
        self.sent = [i for i, p in enumerate(self.local) if self.owners[p.matrix] != rank]  # indices into local
        self.sent_pieces = [self.local[i] for i in self.sent]
        self.kept = [(i, where[p.matrix] + p.start) for i, p in enumerate(self.local) if self.owners[p.matrix] == rank]
        self.send_splits = [sum(p.numel for p in self.local if self.owners[p.matrix] == d) if d != rank else 0
                            for d in range(world_size)]
        incoming = sorted((p for p in pieces if self.owners[p.matrix] == rank and p.rank != rank),
                          key=lambda p: (p.rank, p.matrix, p.start))
        self.recv_splits = [sum(p.numel for p in incoming if p.rank == s) for s in range(world_size)]
        self.incoming = [(where[p.matrix] + p.start, p.numel) for p in incoming]  # (position in owned buffer, numel)
        # Known alike on every rank: when no piece anywhere travels, the ranks skip the collectives together.
        self.travels = any(p.rank != self.owners[p.matrix] for p in pieces)

    @property
    def owned_matrices(self) -> list[MatrixSlice]:
        return [self.matrices[k] for k, _ in self.owned]

    def pieces(self, tensors: list[Optional[torch.Tensor]]) -> list[Piece2D]:
        (flat,) = tensors
        return [(flat.narrow(0, p.offset, p.numel), self.matrices[p.matrix]) for p in self.local]

    def orthogonalise(self, updates, dtype, ns) -> list[torch.Tensor]:
        """NS of every matrix in the flat update ([update]); the results for `self.local`, in order.
        Collective over the group: every rank calls it for the same partition."""
        (update,) = updates
        device = update.device
        # Three buffers, each used both ways: `outgoing` holds the pieces this rank sends, then their
        # results; `incoming` the pieces it receives, then what it returns; `owned` its matrices,
        # orthogonalised in place. So the transient memory is what travels plus what this rank owns.
        outgoing = torch.empty(sum(self.send_splits), dtype=dtype, device=device)
        _pack(outgoing, update, ((p.offset, p.numel) for p in self.sent_pieces))
        incoming = torch.empty(sum(self.recv_splits), dtype=dtype, device=device)
        if self.travels:
            dist.all_to_all_single(incoming, outgoing, self.recv_splits, self.send_splits, group=self.group)
        owned = torch.empty(self.owned_numel, dtype=dtype, device=device)
        _unpack(owned, incoming, self.incoming)
        for i, at in self.kept:
            p = self.local[i]
            owned.narrow(0, at, p.numel).copy_(update.narrow(0, p.offset, p.numel))
        for k, at in self.owned:
            m = self.matrices[k]
            block = owned.narrow(0, at, m.rows * m.cols).view(m.rows, m.cols)
            block.copy_(ns(block))
        _pack(incoming, owned, self.incoming)  # the results go back in the order their pieces came
        if self.travels:
            dist.all_to_all_single(outgoing, incoming, self.send_splits, self.recv_splits, group=self.group)
        del incoming
        out: list[Optional[torch.Tensor]] = [None] * len(self.local)
        for i, result in zip(self.sent, outgoing.split([p.numel for p in self.sent_pieces])):
            out[i] = result
        for i, at in self.kept:
            out[i] = owned.narrow(0, at, self.local[i].numel)
        return out


class ReplicatedExchange:
    """ZeRO-0: every rank holds every matrix whole. Owners orthogonalise; one all_gather shares the results."""

    def __init__(self, slices: list[list[MatrixSlice]], rank: int, world_size: int, group=None,
                 ns_cost: NSCost = ns_multiply_adds):
        self.slices, self.matrices = slices, [m for mine in slices for m in mine]
        self.rank, self.world_size, self.group = rank, world_size, group
        matrices = self.matrices
        self.owners = assign_owners(matrices, world_size, ns_cost=ns_cost)
        self.offsets, loads = [], [0] * world_size
        for k, m in enumerate(matrices):
            self.offsets.append(loads[self.owners[k]])
            loads[self.owners[k]] += m.rows * m.cols
        self.bucket = max(loads)  # every rank's contribution is padded to the largest

    @property
    def owned_matrices(self) -> list[MatrixSlice]:
        return [m for k, m in enumerate(self.matrices) if self.owners[k] == self.rank]

    def pieces(self, tensors: list[Optional[torch.Tensor]]) -> list[Piece2D]:
        return _row_pieces(tensors, self.slices)

    def orthogonalise(self, updates, dtype, ns) -> list[torch.Tensor]:
        """NS of every matrix of the group's updates (the same on every rank); collective."""
        for u, mine in zip(updates, self.slices):
            if u is None:  # the ranks must orthogonalise the same matrices
                raise RuntimeError(f"Muon: {mine[0].param} has no gradient on rank {self.rank}")
        views = [u for u, _ in self.pieces(updates)]
        mine = torch.zeros(self.bucket, dtype=dtype, device=views[0].device)
        for k, (m, u) in enumerate(zip(self.matrices, views)):
            if self.owners[k] == self.rank:
                mine.narrow(0, self.offsets[k], m.rows * m.cols).view(m.rows, m.cols).copy_(ns(u))
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        return [gathered[self.owners[k]].narrow(0, self.offsets[k], m.rows * m.cols).view(m.rows, m.cols)
                for k, m in enumerate(self.matrices)]
