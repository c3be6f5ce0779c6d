"""Muon (Jordan et al., 2024): momentum, then an orthogonalised update by Newton–Schulz, for the 2-D
weights inside the transformer blocks; an auxiliary AdamW for everything else.

For each Muon matrix W with gradient G (torch.optim.Muon's formulation):

    B <- mu * B + (1 - mu) * G                       momentum (EMA form)
    U <- (1 - mu) * G + mu * B   if nesterov else B
    O <- NS(U)                                       quintic Newton–Schulz, Frobenius-normalised,
                                                     on the wide orientation (tall matrices transposed)
    W <- W * (1 - lr * wd) - lr * scale(shape) * O   decoupled decay with the unadjusted lr

The unit of orthogonalisation is a *matrix*: a range of rows of a parameter. GPT-2's fused
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
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

import torch
from torch.optim.adamw import adamw

from modeconn.errors import ConfigError

if TYPE_CHECKING:
    from modeconn.optim.muon_exchange import PartitionExchange, ReplicatedExchange

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ScaleMode = Literal["original", "match_rms_adamw", "spectral"]


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


def _wide_normalised(g: torch.Tensor, dtype: torch.dtype, eps: float) -> tuple[torch.Tensor, bool]:
    """g in `dtype`, transposed if tall, divided by its Frobenius norm; and whether it was tall."""
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    return x / x.norm().clamp(min=eps), tall


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (singular values pushed into about [0.7, 1.2]).
    The same operations, in the same order, as torch.optim.Muon's, so bf16 results agree bit for bit."""
    a, b, c = coefficients
    x, tall = _wide_normalised(g, dtype, eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


GRAM_RESTART = 3  # the Gram form re-forms X and its Gram matrix every 3 steps


def gram_newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`newton_schulz`'s iteration on the Gram matrix of the wide orientation X (m x n, m <= n), after
    Dao et al. (2026). With X_k = Q_k X_0 and G_k = X_k X_k^T, a step X_{k+1} = P_k X_k, where
    P_k = aI + bG_k + cG_k^2, is Q_{k+1} = P_k Q_k and G_{k+1} = P_k G_k P_k: m x m products, and X is
    multiplied only to form G and at the end. The iteration corrects rounding errors in X but not in
    G, so X and G are formed afresh every GRAM_RESTART steps (half precision drifts without it)."""
    a, b, c = coefficients
    x, tall = _wide_normalised(g, dtype, eps)
    gram, q = x @ x.T, None
    for k in range(1, steps + 1):
        p = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        p.diagonal().add_(a)
        q = p if q is None else p @ q
        if k == steps:
            break
        if k % GRAM_RESTART == 0:
            x, q = q @ x, None
            gram = x @ x.T
        else:
            gram = p @ gram @ p
    x = q @ x
    return x.T if tall else x


def ns_multiply_adds(rows: int, cols: int, steps: int = 5, method: str = "standard") -> int:
    """Multiply-adds of one matrix's Newton–Schulz, on the wide orientation (m <= n). Standard: per
    step X X^T (m^2 n), the polynomial (m^3), its product with X (m^2 n). Gram (where cheaper): X is
    multiplied twice per restart; per step P (m^3), Q (m^3) and G (2 m^3) except where skipped."""
    m, n = sorted((rows, cols))
    standard = steps * m * m * (2 * n + m)
    if method != "gram":
        return standard
    restarts = (steps - 1) // GRAM_RESTART
    return min(standard, (2 + 2 * restarts) * m * m * n + (4 * steps - 3 - 3 * restarts) * m ** 3)


def orthogonalise(g: torch.Tensor, cfg: MuonConfig, dtype: torch.dtype) -> torch.Tensor:
    """NS of one matrix as `cfg` asks: the Gram form where it is asked for and takes fewer flops."""
    args = (cfg.ns_steps, tuple(cfg.ns_coefficients), cfg.eps, dtype)
    if ns_multiply_adds(*g.shape, cfg.ns_steps, cfg.ns_method) < ns_multiply_adds(*g.shape, cfg.ns_steps):
        return gram_newton_schulz(g, *args)
    return newton_schulz(g, *args)


def update_scale(rows: int, cols: int, mode: ScaleMode) -> float:
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(rows / cols)  # spectral: sqrt(fan_out / fan_in) for a weight [out, in]


@dataclass(frozen=True)
class MatrixSlice:
    """Rows [row_start, row_end) of a 2-D parameter, orthogonalised as one matrix."""
    param: str
    row_start: int
    row_end: int
    cols: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


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


def apply_update(p: torch.Tensor, update: torch.Tensor, matrices: list[MatrixSlice], lr: float, wd: float,
                 cfg: MuonConfig, dtype: Optional[torch.dtype] = None) -> None:
    """Decay `p`, then subtract lr * scale * NS(update) matrix by matrix (rows of `p`). The lr and
    the scale are one factor, as in torch.optim.Muon, so the rounding is the same."""
    dtype = dtype or resolve_dtype(cfg, update.device)
    p.mul_(1 - lr * wd)
    for m in matrices:
        orth = orthogonalise(update[m.row_start:m.row_end], cfg, dtype)
        p[m.row_start:m.row_end].add_(orth, alpha=-lr * update_scale(m.rows, m.cols, cfg.scale))


FUSED_ADAMW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_adamw_supported(params) -> bool:
    """Whether torch's fused AdamW kernel takes all of `params` (CPU or CUDA tensors of its dtypes)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_ADAMW_DTYPES for p in params)


class Muon(torch.optim.Optimizer):
    """Muon with its auxiliary AdamW in one torch optimizer, in one process or as DeepSpeed's client
    optimizer at any ZeRO stage.

    Param groups carry `use_muon` (True: 2-D block weights, with `matrices` per parameter) or False
    (AdamW with `betas`, `eps`). Every group has `lr`, `weight_decay`, `initial_lr`, `names`.

    Under DeepSpeed, call `attach(engine, model)` once after `deepspeed.initialize`. At ZeRO 1-3
    the groups then hold flat fp32 partitions: momentum lives on this rank's partition only, and each
    matrix is orthogonalised once, by its owner (`muon_exchange`). At ZeRO-0 with several ranks, each
    matrix is orthogonalised once and the results are all-gathered. Unattached, every matrix is
    orthogonalised locally (one process).
    """

    def __init__(self, groups: list[dict], cfg: MuonConfig):
        self.cfg = cfg
        super().__init__(groups, {})
        self._partition_exchange: dict[int, PartitionExchange] = {}  # id(flat partition) -> its plan
        self._replicated_exchange: dict[tuple, ReplicatedExchange] = {}  # group names -> plan (ZeRO-0)

    def attach(self, engine, model) -> None:
        """Learn where every Muon matrix lies on every rank and plan who orthogonalises it.
        Collective: every rank calls it, after `deepspeed.initialize`."""
        import torch.distributed as dist

        from modeconn.optim.muon_exchange import PartitionExchange, ReplicatedExchange, matrix_pieces
        from modeconn.optim.zero_layout import flat_partitions, partition_layout

        rank, world_size = dist.get_rank(), dist.get_world_size()
        cost = functools.partial(ns_multiply_adds, steps=self.cfg.ns_steps, method=self.cfg.ns_method)
        muon_groups = [g for g in self.param_groups if g["use_muon"]]
        matrices = {name: slices for g in muon_groups for name, slices in zip(g["names"], g["matrices"])}
        partitions = flat_partitions(engine)
        if partitions is None:  # ZeRO-0 fp32: whole parameters on every rank
            if world_size > 1:
                for g in muon_groups:
                    flat = [m for name in g["names"] for m in matrices[name]]
                    self._replicated_exchange[tuple(g["names"])] = ReplicatedExchange(flat, rank, world_size,
                                                                                      ns_cost=cost)
            return
        layout = [f for f in partition_layout(engine, model) if f.name in matrices]
        group = getattr(engine.optimizer, "dp_process_group", None)
        for index, flat_partition in enumerate(partitions):
            fragments = [f for f in layout if f.partition == index]
            if fragments:  # from every rank's layout: a rank holding none of it still takes part
                names = sorted({f.name for f in fragments}, key=list(matrices).index)
                slices = [m for name in names for m in matrices[name]]
                self._partition_exchange[id(flat_partition)] = PartitionExchange(
                    slices, matrix_pieces(slices, fragments), rank, world_size, group, cost)

    def owned_matrices(self) -> list[MatrixSlice]:
        """The matrices this rank orthogonalises (all of them when unattached)."""
        if self._partition_exchange:
            return [m for plan in self._partition_exchange.values() for m in plan.owned_matrices]
        if self._replicated_exchange:
            return [m for plan in self._replicated_exchange.values()
                    for k, m in enumerate(plan.matrices) if plan.owners[k] == plan.rank]
        return [m for g in self.param_groups if g["use_muon"] for slices in g["matrices"] for m in slices]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # ZeRO wrappers step one group (or sub-group) at a time
            if not group["use_muon"]:
                self._adamw_group(group)
            elif self._partition_exchange:
                self._muon_partitions(group)
            else:
                self._muon_parameters(group)
        return loss

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        """Update the momentum of `p` (a parameter or a flat partition) and return the update to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - self.cfg.momentum)
        return p.grad.lerp(buf, self.cfg.momentum) if self.cfg.nesterov else buf

    def _ns(self, dtype: torch.dtype):
        return lambda x: orthogonalise(x, self.cfg, dtype)

    def _muon_partitions(self, group: dict) -> None:
        lr, wd, scale = group["lr"], group["weight_decay"], self.cfg.scale
        for flat in group["params"]:
            plan = self._partition_exchange.get(id(flat))
            if plan is None:
                raise RuntimeError(f"Muon: a flat partition of {flat.numel()} elements that attach() did not see "
                                   f"(optimizer offload and parameter swapping are not supported with Muon)")
            dtype = resolve_dtype(self.cfg, flat.device)
            results = plan.orthogonalise(self._momentum(flat), dtype, self._ns(dtype))
            flat.mul_(1 - lr * wd)
            for piece, orth in zip(plan.local, results):
                m = plan.matrices[piece.matrix]
                flat.narrow(0, piece.offset, piece.numel).add_(orth, alpha=-lr * update_scale(m.rows, m.cols, scale))

    def _muon_parameters(self, group: dict) -> None:
        lr, wd, scale = group["lr"], group["weight_decay"], self.cfg.scale
        exchange = self._replicated_exchange.get(tuple(group["names"]))
        work = []
        for name, p, slices in zip(group["names"], group["params"], group["matrices"]):
            if p.dim() != 2:
                raise RuntimeError("Muon: its parameters are flat ZeRO partitions; call optimizer.attach(engine, "
                                   "model) after deepspeed.initialize")
            if p.grad is None:
                if exchange is not None:  # the ranks must orthogonalise the same matrices
                    raise RuntimeError(f"Muon: {name} has no gradient on rank {exchange.rank}")
                continue
            work.append((p, self._momentum(p), slices))
        if exchange is None:
            for p, update, slices in work:
                apply_update(p, update, slices, lr, wd, self.cfg)
            return
        dtype = resolve_dtype(self.cfg, work[0][0].device)
        results = iter(exchange.orthogonalise([u[m.row_start:m.row_end] for _, u, slices in work for m in slices],
                                              dtype, self._ns(dtype)))
        for p, _, slices in work:
            p.mul_(1 - lr * wd)
            for m in slices:
                p[m.row_start:m.row_end].add_(next(results), alpha=-lr * update_scale(m.rows, m.cols, scale))

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
