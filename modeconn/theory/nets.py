"""The testbed's networks and data sets.

- Two-layer ReLU network f(x) = Σ_j a_j relu(w_j·x + b_j) (biases optional), scalar output,
  trained on a teacher of the same form: inputs x ~ N(0, I_d), labels from a random teacher of
  width `teacher_width`; squared loss ½ (f − y)².
- One-hidden-layer ReLU MLP on scikit-learn's 8×8 digits (1797 images shipped inside scikit-learn,
  no download): pixels scaled to [0, 1], a fixed split, cross-entropy; error = misclassified share.

Parameters are plain tensors in a state dict so that a path point is Σ c_i θ_i over state dicts
and a network is evaluated at any point with `torch.func.functional_call`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class TwoLayerReLU(nn.Module):
    """f(x) = Σ_j a_j relu(w_j·x + b_j); w: [width, d] (one row per unit), a: [width]."""

    block_modules = ("hidden",)  # its block: the hidden layer (optim/roles.py); `out` is the head

    def __init__(self, d: int, width: int, bias: bool = False):
        super().__init__()
        self.hidden = nn.Linear(d, width, bias=bias)
        self.out = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x))).squeeze(-1)


class MLP(nn.Module):
    """One hidden ReLU layer: x [n, d_in] -> logits [n, classes]."""

    block_modules = ("hidden",)  # its block: the hidden layer (optim/roles.py); `out` is the head

    def __init__(self, d_in: int, width: int, classes: int):
        super().__init__()
        self.hidden = nn.Linear(d_in, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x)))


@dataclass
class Task:
    """A data set with its loss and error (error: None for regression)."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classification: bool

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return F.cross_entropy(output, y)
        return 0.5 * (output - y).square().mean()

    def error(self, output: torch.Tensor, y: torch.Tensor) -> float:
        if self.classification:
            return (output.argmax(-1) != y).float().mean().item()
        return float("nan")


def teacher_student(d: int, teacher_width: int, n_train: int, n_test: int, seed: int = 0) -> Task:
    """Gaussian inputs labelled by a random two-layer ReLU teacher (unit-norm rows, output weights ±1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(teacher_width, d, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    a = torch.where(torch.rand(teacher_width, generator=g) < 0.5, -1.0, 1.0)
    x = torch.randn(n_train + n_test, d, generator=g)
    y = F.relu(x @ w.T) @ a
    return Task(f"teacher-student d={d}, teacher width {teacher_width}", x[:n_train], y[:n_train], x[n_train:],
                y[n_train:], classification=False)


def digits(n_train: int = 1500, seed: int = 0) -> Task:
    """scikit-learn's 8×8 digits, pixels / 16, split by a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return Task("digits 8x8", x[:n_train], y[:n_train], x[n_train:], y[n_train:], classification=True)


def make_net(task: Task, width: int, bias: bool = False) -> nn.Module:
    if task.classification:
        return MLP(task.x_train.shape[1], width, int(task.y_train.max()) + 1)
    return TwoLayerReLU(task.x_train.shape[1], width, bias)


def init_state(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Initial parameters from `seed` alone: w ~ N(0, 1/fan_in) for the hidden layer, the output
    layer ~ N(0, 1/width) (biases 0), so widths compare at one scale."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            state[name] = torch.zeros_like(p)
        else:
            state[name] = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
    return state
