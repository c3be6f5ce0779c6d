"""Muon (Jordan et al., 2024): momentum, then an orthogonalised update by Newton–Schulz, for the 2-D
weights inside the transformer blocks; an auxiliary AdamW for everything else.

For each Muon matrix W with gradient G (torch.optim.Muon's formulation):

    B <- mu * B + (1 - mu) * G                       momentum (EMA form)
    U <- (1 - mu) * G + mu * B   if nesterov else B
    O <- NS(U)                                       quintic Newton–Schulz, Frobenius-normalised,
                                                     on the wide orientation (tall matrices transposed)
    W <- W * (1 - lr * wd) - lr * scale(shape) * O   decoupled decay with the unadjusted lr

The arithmetic (Newton–Schulz, its cost, the matrix slices, the scale) is in newton_schulz.py, a
leaf. The unit of orthogonalisation is a *matrix*: a range of rows of a parameter. GPT-2's fused
attention weight c_attn [3d, d] is three matrices (Q, K, V, as in the seed study), or 3 x n_head
with `split_heads`. A row range of a row-major tensor is one contiguous run of its elements, which
is what lets the distributed version find each matrix inside ZeRO's flat partitions.

Distributed (`Muon.attach`, `muon_exchange`): momentum, weight decay and the update act on each
rank's own slice of ZeRO's flat fp32 partition; only Newton–Schulz needs whole matrices, so each
matrix goes to one owner rank and comes back orthogonalised. Gradient clipping (DeepSpeed's) acts
on the raw gradient, before the momentum, and NS runs once per optimizer step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

import torch
from torch.optim.adamw import adamw

from modeconn.errors import ConfigError
from modeconn.optim.muon_exchange import Exchange, LocalExchange, PartitionExchange, ReplicatedExchange, matrix_pieces
# MatrixSlice is imported here also so that checkpoints pickled when it lived in this module load.
from modeconn.optim.newton_schulz import (DEFAULT_COEFFICIENTS, MatrixSlice, ScaleMode, gram_newton_schulz,
                                          newton_schulz, ns_multiply_adds, update_scale)
from modeconn.optim.zero_layout import flat_partitions, partition_layout


@dataclass
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: list[float] = field(default_factory=lambda: list(DEFAULT_COEFFICIENTS))
    ns_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU; see resolve_dtype
    # gram: the same iteration on each matrix's Gram matrix where that takes fewer flops (long side
    # > 1.5x the short: MLP and fused-QKV weights); equal to rounding, not bit for bit
    ns_method: Literal["standard", "gram"] = "standard"
    eps: float = 1e-7
    scale: ScaleMode = "original"
    split_qkv: bool = True  # Q, K, V orthogonalised as separate matrices (the seed study)
    split_heads: bool = False  # and each head separately

    def __post_init__(self):
        if len(self.ns_coefficients) != 3 or self.ns_steps < 1 or not 0 <= self.momentum < 1:
            raise ConfigError("optim.muon: ns_coefficients must be 3 numbers, ns_steps >= 1, momentum in [0, 1)")
        if self.split_heads and not self.split_qkv:
            raise ConfigError("optim.muon.split_heads needs split_qkv")
        if self.ns_method not in ("standard", "gram"):
            raise ConfigError(f"optim.muon.ns_method must be standard or gram, got {self.ns_method!r}")
        if self.ns_method == "gram" and self.ns_dtype == "bfloat16":
            raise ConfigError("optim.muon.ns_method gram needs ns_dtype float32, float16 or auto: in bf16 the Gram "
                              "form's error is 2-4x the standard form's")


def orthogonalise(g: torch.Tensor, cfg: MuonConfig, dtype: torch.dtype) -> torch.Tensor:
    """NS of one matrix as `cfg` asks: the Gram form where it is asked for and takes fewer flops."""
    args = (cfg.ns_steps, tuple(cfg.ns_coefficients), cfg.eps, dtype)
    if ns_multiply_adds(*g.shape, cfg.ns_steps, cfg.ns_method) < ns_multiply_adds(*g.shape, cfg.ns_steps):
        return gram_newton_schulz(g, *args)
    return newton_schulz(g, *args)


def muon_matrices(name: str, shape: tuple[int, int], n_head: int, cfg: MuonConfig) -> list[MatrixSlice]:
    """How one Muon parameter splits into matrices (data, not code paths: one rule per layout)."""
    rows, cols = shape
    if name.endswith("attn.c_attn.weight") and cfg.split_qkv:
        parts = 3 * n_head if cfg.split_heads else 3
        step = rows // parts
        return [MatrixSlice(name, i * step, (i + 1) * step, cols) for i in range(parts)]
    return [MatrixSlice(name, 0, rows, cols)]


def resolve_dtype(cfg: MuonConfig, device: torch.device) -> torch.dtype:
    """`ns_dtype`; auto is fp32 on CPU and, on GPU, bf16 for the standard form (torch.optim.Muon's
    arithmetic) and fp16 for the Gram form, whose m x m products need fp16's longer mantissa."""
    if cfg.ns_dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if cfg.ns_method == "gram" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.ns_dtype]


@dataclass
class MuonGroup:
    """One parameter group of `Muon`, typed: Muon's matrices (`matrices` given: each parameter's
    slices) or the auxiliary AdamW's parameters (`betas`, `eps`). torch holds it as a dict."""
    names: list[str]
    params: list[torch.Tensor]
    lr: float
    weight_decay: float
    matrices: Optional[list[list[MatrixSlice]]] = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def as_param_group(self) -> dict:
        group = {"params": self.params, "names": self.names, "lr": self.lr, "initial_lr": self.lr,
                 "weight_decay": self.weight_decay, "use_muon": self.matrices is not None}
        group.update({"matrices": self.matrices} if self.matrices is not None else {"betas": self.betas,
                                                                                      "eps": self.eps})
        return group


def muon_param_groups(named_roles: Iterable[tuple[str, torch.Tensor, str]], cfg: MuonConfig, n_head: int, lr: float,
                      weight_decay: float, aux_lr: float, aux_betas, aux_eps: float, aux_weight_decay: float,
                      decay_embeddings: bool = True) -> list[MuonGroup]:
    """Routing by role (modeconn/optim/roles.py): block matrices to Muon, each with its matrix slices;
    the head and embeddings (decayed unless `decay_embeddings` is off) and the gains and biases (never
    decayed) to the auxiliary AdamW. Empty groups are left out."""
    muon = MuonGroup([], [], lr, weight_decay, matrices=[])
    aux_decay = MuonGroup([], [], aux_lr, aux_weight_decay, betas=tuple(aux_betas), eps=aux_eps)
    aux_plain = MuonGroup([], [], aux_lr, 0.0, betas=tuple(aux_betas), eps=aux_eps)
    for name, p, role in named_roles:
        if not p.requires_grad:
            continue
        if role == "matrix":
            group = muon
            muon.matrices.append(muon_matrices(name, tuple(p.shape), n_head, cfg))
        else:
            group = aux_decay if role == "head" or (role == "embedding" and decay_embeddings) else aux_plain
        group.names.append(name)
        group.params.append(p)
    return [g for g in (muon, aux_decay, aux_plain) if g.params]


FUSED_ADAMW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_adamw_supported(params) -> bool:
    """Whether torch's fused AdamW kernel takes all of `params` (CPU or CUDA tensors of its dtypes)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_ADAMW_DTYPES for p in params)


class Muon(torch.optim.Optimizer):
    """Muon with its auxiliary AdamW in one torch optimizer, in one process or as DeepSpeed's client
    optimizer at any ZeRO stage.

    Built from `MuonGroup`s (`muon_param_groups`); torch holds them as dicts with `use_muon`,
    `names`, `lr`, `weight_decay`, `initial_lr`, and `matrices` (Muon) or `betas`, `eps` (AdamW).

    Under DeepSpeed, call `attach(engine, model)` once after `deepspeed.initialize`; it picks each
    unit's exchange (`muon_exchange`). At ZeRO 1-3 the groups then hold flat fp32 partitions:
    momentum lives on this rank's partition only, and each matrix is orthogonalised once, by its
    owner. At ZeRO-0 with several ranks, each matrix is orthogonalised once and the results are
    all-gathered. Unattached, every matrix is orthogonalised here (one process). The update itself
    is written once (`_muon_group`), whichever exchange delivers NS.
    """

    def __init__(self, groups: list[MuonGroup], cfg: MuonConfig):
        self.cfg = cfg
        super().__init__([g.as_param_group() for g in groups], {})
        # How each unit of Muon storage is orthogonalised: a group's parameters (by its names) or,
        # once attached at ZeRO 1-3, a flat partition (by its id). Chosen once, here and in attach().
        self.exchanges: dict[object, Exchange] = {
            tuple(g["names"]): LocalExchange(g["matrices"]) for g in self.param_groups if g["use_muon"]}

    def attach(self, engine, model) -> None:
        """Learn where every Muon matrix lies on every rank and plan who orthogonalises it.
        Collective: every rank calls it, after `deepspeed.initialize`."""
        import torch.distributed as dist

        rank, world_size = dist.get_rank(), dist.get_world_size()
        cost = functools.partial(ns_multiply_adds, steps=self.cfg.ns_steps, method=self.cfg.ns_method)
        muon_groups = [g for g in self.param_groups if g["use_muon"]]
        matrices = {name: slices for g in muon_groups for name, slices in zip(g["names"], g["matrices"])}
        partitions = flat_partitions(engine)
        if partitions is None:  # ZeRO-0 fp32: whole parameters on every rank
            if world_size > 1:
                self.exchanges = {tuple(g["names"]): ReplicatedExchange(g["matrices"], rank, world_size, ns_cost=cost)
                                  for g in muon_groups}
            return
        layout = [f for f in partition_layout(engine, model) if f.name in matrices]
        group = getattr(engine.optimizer, "dp_process_group", None)
        self.exchanges = {}
        for index, flat_partition in enumerate(partitions):
            fragments = [f for f in layout if f.partition == index]
            if fragments:  # from every rank's layout: a rank holding none of it still takes part
                names = sorted({f.name for f in fragments}, key=list(matrices).index)
                slices = [m for name in names for m in matrices[name]]
                self.exchanges[id(flat_partition)] = PartitionExchange(
                    slices, matrix_pieces(slices, fragments), rank, world_size, group, cost)

    def owned_matrices(self) -> list[MatrixSlice]:
        """The matrices this rank orthogonalises (all of them in one process)."""
        return [m for exchange in self.exchanges.values() for m in exchange.owned_matrices]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # ZeRO wrappers step one group (or sub-group) at a time
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _units(self, group: dict) -> list[tuple[list[torch.Tensor], Exchange]]:
        """The group's storage as (tensors, the exchange that orthogonalises them) units."""
        params = group["params"]
        if not params:  # ZeRO-3 hands over one sub-group's partition at a time; the other groups are empty
            return []
        if all(p.dim() == 2 for p in params):
            return [(params, self.exchanges[tuple(group["names"])])]
        if tuple(group["names"]) in self.exchanges:
            raise RuntimeError("Muon: its parameters are flat ZeRO partitions; call optimizer.attach(engine, model) "
                               "after deepspeed.initialize")
        for flat in params:
            if id(flat) not in self.exchanges:
                raise RuntimeError(f"Muon: a flat partition of {flat.numel()} elements that attach() did not see "
                                   f"(optimizer offload and parameter swapping are not supported with Muon)")
        return [([flat], self.exchanges[id(flat)]) for flat in params]

    def _muon_group(self, group: dict) -> None:
        """Momentum, then W <- W (1 - lr wd) - lr scale NS(update), matrix piece by matrix piece. The
        lr and the scale are one factor, as in torch.optim.Muon, so the rounding is the same."""
        lr, wd = group["lr"], group["weight_decay"]
        for tensors, exchange in self._units(group):
            updates = [self._momentum(t) if t.grad is not None else None for t in tensors]
            present = [t if u is not None else None for t, u in zip(tensors, updates)]
            dtype = resolve_dtype(self.cfg, tensors[0].device)
            results = exchange.orthogonalise(updates, dtype, lambda x: orthogonalise(x, self.cfg, dtype))
            for t in present:
                if t is not None:
                    t.mul_(1 - lr * wd)
            for (target, m), orth in zip(exchange.pieces(present), results):
                target.add_(orth, alpha=-lr * update_scale(m.rows, m.cols, self.cfg.scale))

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        """Update the momentum of `p` (a parameter or a flat partition) and return the update to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - self.cfg.momentum)
        return p.grad.lerp(buf, self.cfg.momentum) if self.cfg.nesterov else buf

    def _adamw_group(self, group: dict) -> None:
        """torch's AdamW arithmetic (its fused kernel on CPU and CUDA) on this group's parameters or partitions."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            # The fused kernel counts steps in a float32 scalar on the parameter's device.
            state["step"] = torch.as_tensor(state.get("step", 0.0), dtype=torch.float32, device=p.device)
        if not params:
            return
        (beta1, beta2), states = group["betas"], [self.state[p] for p in params]
        fused = fused_adamw_supported(params)
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], fused=fused, foreach=None if fused else False, amsgrad=False, beta1=beta1,
              beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
