"""Paths, barriers and spectra of the testbed's networks, through the product's own code: a path
point is Σ c_i θ_i with the coefficients of `modeconn.paths`, barriers are `modeconn.barrier`'s,
singular values and stable rank are `modeconn.spectra`'s."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from modeconn.barrier import barriers
from modeconn.paths import WeightPath, t_grid
from modeconn.spectra import summarize, svdvals
from modeconn.stream import weighted_sum
from modeconn.theory.nets import Task
from modeconn.theory.training import evaluate

State = dict[str, torch.Tensor]


def combine(points: Sequence[State], coefficients) -> State:
    """Σ c_i θ_i with the probe's summation (`modeconn.stream.weighted_sum`)."""
    return {name: weighted_sum((points[i][name], c) for i, c in coefficients) for name in points[0]}


def path_curve(net: nn.Module, task: Task, points: Sequence[State], path: WeightPath, ts: Sequence[float]) -> dict:
    """Train/test loss and error at every t, and the barriers of train loss and test error."""
    rows = [evaluate(net, task, combine(points, path.coefficients(t))) for t in ts]
    curve = {key: [r[key] for r in rows] for key in rows[0]}
    curve["t"] = list(ts)
    curve["loss_barrier"] = barriers(ts, curve["train_loss"])["linear"]
    curve["test_loss_barrier"] = barriers(ts, curve["test_loss"])["linear"]
    if task.classification:
        curve["error_barrier"] = barriers(ts, curve["test_error"])["linear"]
    return curve


def linear_barrier(net: nn.Module, task: Task, a: State, b: State, points: int = 11) -> dict:
    return path_curve(net, task, [a, b], WeightPath("linear", ("a", "b")), t_grid(1 / (points - 1)))


def distance(a: State, b: State) -> float:
    return math.sqrt(sum((a[k] - b[k]).double().square().sum().item() for k in a))


def stable_rank(state: State, name: str = "hidden.weight") -> float:
    return summarize(svdvals(state[name]))["stable_rank"]


def fit_star_centre(net: nn.Module, task: Task, anchors: Sequence[State], steps: int, lr: float,
                    batch_size: int, seed: int) -> State:
    """A centre c whose straight paths to every anchor have low training loss: from the anchors'
    mean, minimise E over anchor k and t ~ U(0, 1) of loss((1 − t) c + t θ_k) with Adam (the
    in-memory counterpart of train.py's path_fit kind "star")."""
    centre = {k: nn.Parameter(torch.stack([a[k] for a in anchors]).mean(0)) for k in anchors[0]}
    optimizer = torch.optim.Adam(list(centre.values()), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(task.y_train)
    for _ in range(steps):
        k = int(torch.randint(len(anchors), (1,), generator=g))
        t = float(torch.rand((), generator=g))
        index = torch.randint(n, (min(batch_size or n, n),), generator=g)
        point = {name: (1 - t) * centre[name] + t * anchors[k][name] for name in centre}
        loss = task.loss(functional_call(net, point, (task.x_train[index],)), task.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {k: p.detach().clone() for k, p in centre.items()}
