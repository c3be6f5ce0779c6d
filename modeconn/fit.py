"""Path fitting: train the bend of a polygonal chain, the control point of a Bezier curve, or the
centre of a star, with the path's other points frozen.

`PathPoint` is the trainable point, a GPT whose own parameters are θ_free (so the trainer,
DeepSpeed, every optimizer including Muon's role routing, checkpoints and exports treat it as
any GPT, and the final export is the point itself, which probe.py reads). Its training forward
draws t (and for a star, an anchor) per micro-batch and runs the network at θ(t) = Σ_i c_i(t) θ_i,
the coefficients of `modeconn.paths` (one t convention everywhere), through a weightless copy of
the architecture (`Architecture`); the gradient reaches θ_free through its coefficient.
Objectives (Garipov et al. 2018 for curves; Starlight for stars):
- chain (A, bend, B) and bezier (A, control, B): E_t L(θ(t)), t ~ U[t_range];
- star (centre; anchors a_1..a_k): E_j E_t L((1 − t) θ_centre + t θ_j), j uniform, t ~ U[t_range].
Evaluation (the trainer's validation) runs at one fixed point: chain and bezier at t = 0.5, a star
at its centre.

The draw of micro-batch n on rank r is a function of (seed, r, n) alone, and n is set from the
step on resume, so a resumed fit draws what an unbroken one would have.

At ZeRO stage 3 each rank holds a partition of the free point, which ZeRO-3 gathers only around
the forward of the submodule that owns a parameter; the combination reads the point outside any
such forward, so `Zero3Point` gathers it explicitly (see there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from modeconn.errors import ConfigError
from modeconn.hf import load_hf
from modeconn.model import GPT, ModelConfig
from modeconn.optim.zero_layout import zero3_partitioned
from modeconn.paths import WeightPath, star
from modeconn.stream import WeightSource, check_compatible


@dataclass
class PathFitConfig:
    kind: Literal["chain", "bezier", "star"] = "chain"
    # chain, bezier: [A, B] (the bend or control point is trained); star: the anchors (the centre is trained)
    endpoints: list[str] = field(default_factory=list)
    t_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # t ~ U[low, high] per micro-batch

    def validate(self) -> None:
        wanted = (2, 2) if self.kind in ("chain", "bezier") else (2, 10 ** 6)
        if not wanted[0] <= len(self.endpoints) <= wanted[1]:
            raise ConfigError(f"path_fit: a {self.kind} needs {'2 endpoints' if wanted[1] == 2 else '2 or more anchors'}"
                              f", got {len(self.endpoints)}")
        low, high = self.t_range
        if not 0.0 <= low < high <= 1.0:
            raise ConfigError(f"path_fit.t_range must be [low, high] with 0 <= low < high <= 1, got {self.t_range}")


def _load_points(paths: list[str]) -> tuple[ModelConfig, list[dict[str, torch.Tensor]]]:
    """The frozen points in our layout, after checking they are one architecture."""
    config = check_compatible([WeightSource(Path(p)) for p in paths])
    return config, [load_hf(Path(p))[1] for p in paths]


class PathPoint(GPT):
    def __init__(self, cfg: PathFitConfig, model_cfg: ModelConfig, frozen: list[dict[str, torch.Tensor]], seed: int,
                 rank: int):
        super().__init__(model_cfg)
        self.fit = cfg
        names = [n for n, _ in self.named_parameters()]  # a tied head appears once, as the embedding
        # Frozen points by their name on the path, as plain tensors (not buffers: no engine
        # broadcasts, partitions or saves them).
        labels = ["A", "B"] if cfg.kind != "star" else [str(j) for j in range(len(frozen))]
        self._frozen = {label: {n: f[n].float() for n in names} for label, f in zip(labels, frozen)}
        # Not a module: no engine hooks, partitions or counts it.
        self._architecture = Architecture(model_cfg)
        self.seed, self.rank = seed, rank
        self.draws = 0  # micro-batches drawn so far on this rank (set from the step on resume)
        self._zero3: Optional[Zero3Point] = None
        with torch.no_grad():  # start on the straight path: the mean of the frozen points
            for n, p in self.named_parameters():
                p.copy_(sum(f[n] for f in self._frozen.values()) / len(self._frozen))

    def attach(self, engine, model) -> None:
        """Once DeepSpeed has wrapped this module: at ZeRO-3 its parameters are partitioned, and the
        path reads them whole through `Zero3Point`."""
        if zero3_partitioned(next(self.parameters())):
            self._zero3 = Zero3Point(list(self.parameters()))

    def resume_at(self, step: int, grad_accum: int) -> None:
        """The draws of t continue where they stopped: one per micro-batch of every step so far."""
        self.draws = step * grad_accum

    def paths(self) -> list[WeightPath]:
        """The paths through the free point: one for a chain or curve, one per anchor for a star."""
        if self.fit.kind == "star":
            return star("free", list(self._frozen))
        return [WeightPath(self.fit.kind, ("A", "free", "B"))]

    def draw(self) -> tuple[WeightPath, float]:
        """(path, t) of the next micro-batch: a function of (seed, rank, micro-batch number) alone."""
        gen = np.random.default_rng([self.seed, self.rank, self.draws])
        self.draws += 1
        low, high = self.fit.t_range
        t = float(low + (high - low) * gen.random())
        paths = self.paths()
        return paths[int(gen.integers(len(paths)))], t

    def weights_at(self, path: WeightPath, t: float) -> dict[str, torch.Tensor]:
        """θ(t) on `path`: the free point is this module's parameters (the gradient reaches them
        through their coefficient), the others are frozen."""
        out = {}
        for name, p in self.named_parameters():
            total = None
            for index, c in path.coefficients(t):
                label = path.points[index]
                term = p * c if label == "free" else self._frozen[label][name].to(device=p.device, dtype=p.dtype) * c
                total = term if total is None else total + term
            out[name] = total
        return out

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        if self.training:
            path, t = self.draw()
        else:  # validation at one fixed point: a curve's middle, a star's centre
            path, t = self.paths()[0], 0.0 if self.fit.kind == "star" else 0.5
        with self._zero3.gathered() if self._zero3 else contextlib.nullcontext():
            weights = self.weights_at(path, t)
        net = self._architecture.with_weights(weights)
        net.train(self.training)
        net.checkpoint_blocks = self.checkpoint_blocks
        logits, loss = net(idx, targets)
        if self._zero3 and loss is not None and loss.requires_grad:
            loss.register_hook(self._zero3.gather_for_backward)
        return logits, loss


class Architecture:
    """GPT's computation with weights given per forward: a GPT on the meta device whose parameters
    are replaced by plain tensor attributes. The weights stay set after the forward, so activation
    checkpointing's recomputation in backward uses them (torch.func.functional_call would have
    restored the meta parameters by then)."""

    def __init__(self, cfg: ModelConfig):
        self.net = GPT(cfg).to("meta")
        canonical = {id(p): name for name, p in self.net.named_parameters()}  # a tied weight: its first name
        self.slots = [(module, attr, canonical[id(p)]) for module in self.net.modules()
                      for attr, p in list(module.named_parameters(recurse=False))]
        for module, attr, _ in self.slots:
            delattr(module, attr)

    def with_weights(self, weights: dict[str, torch.Tensor]) -> GPT:
        for module, attr, name in self.slots:
            setattr(module, attr, weights[name])
        return self.net


class Zero3Point:
    """The free point's ZeRO-3 partitions, gathered where the path reads the point whole.

    Forward: gathered for the combination θ(t) only. Backward: autograd accumulates a parameter's
    gradient only into a parameter of the gradient's shape, so the point is gathered again when
    backward starts (a hook on the loss). Each parameter's gradient is then reduce-scattered by
    ZeRO-3's own post-accumulate hook, and the hook registered here, after ZeRO-3's (hooks run in
    the order registered), partitions the parameter again. Gradients, optimizer state and the
    stored parameters stay partitioned; the whole point exists on each rank only while in use, as
    θ(t) and the frozen points already do."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        for p in params:
            p.register_post_accumulate_grad_hook(lambda q: q.partition(param_list=[q]))

    def gathered(self):
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params)

    def gather_for_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.params[0].all_gather(param_list=self.params)
        return grad


def build_path_point(cfg: PathFitConfig, seed: int, rank: int) -> PathPoint:
    cfg.validate()
    model_cfg, frozen = _load_points(cfg.endpoints)
    return PathPoint(cfg, model_cfg, frozen, seed, rank)
