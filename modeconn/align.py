"""GPT-2's symmetries: function-preserving transforms of a checkpoint, and weight matching of one
checkpoint to another.

A GPT-2 computes the same function after
- folding each LayerNorm's gain (and bias) into the linear layer that reads it: ln_1 into c_attn,
  ln_2 into c_fc, ln_f's gain into lm_head (lm_head has no bias to take ln_f's bias, which
  becomes β/g, stays, and rotates with the residual stream). A tied model is untied first: the
  folded head is no longer the embedding;
- centring the weights that write into the residual stream (wte, wpe, both c_proj): every
  reader of the stream is a LayerNorm, which removes the mean anyway;
- permuting the hidden units of an MLP (c_fc rows and bias, c_proj columns);
- permuting the heads of an attention layer (Q, K and V rows of c_attn together, c_proj columns);
- once the LayerNorm gains are folded: an orthogonal map R of the residual stream that keeps the
  all-ones direction (R·1 = 1). LayerNorm subtracts the mean, i.e. projects out 1; an R that
  maps 1 to itself commutes with that projection and keeps norms, so LN(Rx) = R·LN(x). (A
  general rotation would need LayerNorm replaced by RMSNorm; this one keeps the checkpoint a
  GPT-2 that any GPT-2 reader loads.)

The symmetries are declared once, as data (`gpt2_symmetries`: which axis of which tensor each
permutation or rotation acts on), and generic algorithms use the declaration: `apply`
transforms a state dict, `weight_matching` finds the transforms that bring B's weights closest to
A's (coordinate descent: one symmetry at a time, the Hungarian algorithm for a permutation, the
orthogonal Procrustes solution for the rotation; Ainsworth et al. 2023 for the permutations), and
`activation_matching` the transforms that bring B's activations on a few validation windows
closest to A's (the same solvers; the activations of a symmetry are the inputs of the linear
layers it acts on along their input axis).

State dicts here are ours (`GPT.state_dict()` names, [out, in] layout), in fp32.

    python align.py --reference=out/run-a/final --checkpoint=out/run-b/final --out=out/run-b-aligned
    python align.py ... --align.method=activations --data.dir=data/shakespeare --data.val_windows=32
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from modeconn import config as config_lib
from modeconn.config import DataConfig
from modeconn.data.loader import TokenWindows, ValidationSet
from modeconn.errors import CheckpointError, ConfigError, ModeconnError
from modeconn.hf import load_hf, read_meta, save_hf
from modeconn.lock import lock_for_target
from modeconn.model import GPT, ModelConfig
from modeconn.stream import WeightSource, check_compatible

State = dict[str, torch.Tensor]


# --- the declaration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """Axis `dim` of `tensor`, seen as [groups, size, block]: the symmetry acts on the middle
    index (e.g. c_attn's rows: Q, K, V groups of n_head heads of head_dim rows each)."""
    tensor: str
    dim: int
    groups: int = 1
    block: int = 1


@dataclass(frozen=True)
class Symmetry:
    name: str
    kind: Literal["permutation", "rotation"]
    size: int
    axes: tuple[Axis, ...]


def gpt2_symmetries(cfg: ModelConfig, heads: bool = True, units: bool = True, residual: bool = False
                    ) -> list[Symmetry]:
    """The symmetries of a GPT-2 with `cfg`. `residual` (the rotation) assumes folded LayerNorms."""
    d, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    biases = cfg.bias
    out = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        if units:
            axes = [Axis(p + "mlp.c_fc.weight", 0), Axis(p + "mlp.c_proj.weight", 1)]
            axes += [Axis(p + "mlp.c_fc.bias", 0)] if biases else []
            out.append(Symmetry(f"h.{i}.mlp", "permutation", cfg.ffn_width, tuple(axes)))
        if heads:
            axes = [Axis(p + "attn.c_attn.weight", 0, groups=3, block=hd), Axis(p + "attn.c_proj.weight", 1, block=hd)]
            axes += [Axis(p + "attn.c_attn.bias", 0, groups=3, block=hd)] if biases else []
            out.append(Symmetry(f"h.{i}.heads", "permutation", cfg.n_head, tuple(axes)))
    if residual:
        axes = [Axis("transformer.wte.weight", 1), Axis("transformer.wpe.weight", 1), Axis("lm_head.weight", 1)]
        axes += [Axis("transformer.ln_f.bias", 0)] if biases else []
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            axes += [Axis(p + "attn.c_attn.weight", 1), Axis(p + "attn.c_proj.weight", 0),
                     Axis(p + "mlp.c_fc.weight", 1), Axis(p + "mlp.c_proj.weight", 0)]
            axes += [Axis(p + "attn.c_proj.bias", 0), Axis(p + "mlp.c_proj.bias", 0)] if biases else []
        out.append(Symmetry("residual", "rotation", d, tuple(axes)))
    return out


# --- one generic algorithm over the declaration -----------------------------------------------------

def _axis_first(t: torch.Tensor, axis: Axis) -> torch.Tensor:
    """[size, everything else]: the symmetry's index first, the rest flattened (a fixed order)."""
    moved = t.movedim(axis.dim, 0)
    rest = moved.shape[1:]
    view = moved.reshape(axis.groups, -1, axis.block, *rest)
    return view.movedim(1, 0).reshape(view.shape[1], -1)


def _apply_on_axis(t: torch.Tensor, axis: Axis, transform: torch.Tensor) -> torch.Tensor:
    """new[i] = Σ_j M[i, j] old[j] along the axis (M a permutation, given as indices, or a matrix)."""
    moved = t.movedim(axis.dim, 0)
    rest = moved.shape[1:]
    view = moved.reshape(axis.groups, -1, axis.block, *rest)
    if transform.dim() == 1:
        view = view.index_select(1, transform)
    else:
        view = torch.einsum("ij,gjb...->gib...", transform.to(view.dtype), view)
    return view.reshape(moved.shape).movedim(0, axis.dim).contiguous()


def identity(symmetry: Symmetry) -> torch.Tensor:
    if symmetry.kind == "permutation":
        return torch.arange(symmetry.size)
    return torch.eye(symmetry.size, dtype=torch.float64)


def apply(state: State, symmetries: list[Symmetry], transforms: dict[str, torch.Tensor]) -> State:
    """`state` with each symmetry's transform applied (a tied head follows its embedding)."""
    out = dict(state)
    tied = "lm_head.weight" in state and state["lm_head.weight"] is state.get("transformer.wte.weight")
    for sym in symmetries:
        if sym.name not in transforms:
            continue
        for axis in sym.axes:
            if axis.tensor in out and not (tied and axis.tensor == "lm_head.weight"):
                out[axis.tensor] = _apply_on_axis(out[axis.tensor], axis, transforms[sym.name])
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _complement_basis(d: int) -> torch.Tensor:
    """[d, d-1]: an orthonormal basis of the vectors orthogonal to the all-ones direction."""
    ones = torch.ones(d, 1, dtype=torch.float64) / math.sqrt(d)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(d, dtype=torch.float64)[:, : d - 1]], dim=1))
    return q[:, 1:]


def _best_transform(symmetry: Symmetry, correlation: torch.Tensor) -> torch.Tensor:
    """The transform M maximising Σ M_ij C_ij: a permutation (Hungarian algorithm) or an
    orthogonal map keeping the all-ones direction (Procrustes on its complement)."""
    if symmetry.kind == "permutation":
        _, columns = linear_sum_assignment(correlation.numpy(), maximize=True)
        return torch.from_numpy(np.asarray(columns, dtype=np.int64))
    basis = _complement_basis(symmetry.size)
    u, _, vh = torch.linalg.svd(basis.T @ correlation @ basis)
    return basis @ (u @ vh) @ basis.T + torch.full_like(correlation, 1.0 / symmetry.size)


def _moved_indices(symmetries: list[Symmetry], transforms: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per permutation: how many indices it moves."""
    return {s.name: int((transforms[s.name] != identity(s)).sum()) for s in symmetries if s.kind == "permutation"}


@dataclass
class MatchResult:
    transforms: dict[str, torch.Tensor]
    similarity_before: float  # Σ ⟨A, B⟩ over the tensors the symmetries touch (activations: per token)
    similarity_after: float
    sweeps: int
    changed: dict[str, int] = field(default_factory=dict)  # per permutation: how many indices moved


def weight_matching(a: State, b: State, symmetries: list[Symmetry], max_sweeps: int = 50, seed: int = 0,
                    tolerance: float = 1e-6) -> MatchResult:
    """Transforms of B that maximise Σ ⟨A, T(B)⟩ over the tensors the symmetries touch, by
    coordinate descent: each symmetry in turn (a seeded random order per sweep) takes its best
    transform given the others' current ones. A symmetry is solved again only after one that shares
    a tensor with it has changed, so permutations alone (which share none) take one sweep; it
    stops when nothing changes (a rotation: by less than `tolerance` in Frobenius norm) or after
    `max_sweeps`. Correlations are computed in fp32, the transforms in fp64."""
    a = {k: v.float() for k, v in a.items()}
    b = {k: v.float() for k, v in b.items()}
    transforms = {s.name: identity(s) for s in symmetries}
    touching: dict[str, list[tuple[Symmetry, Axis]]] = {}
    for sym in symmetries:
        for axis in sym.axes:
            touching.setdefault(axis.tensor, []).append((sym, axis))
    tensors = [name for name in touching if name in a]
    neighbours = {s.name: {other.name for axis in s.axes for other, _ in touching[axis.tensor] if other is not s}
                  for s in symmetries}

    def similarity() -> float:
        moved = apply({n: b[n] for n in tensors}, symmetries, transforms)
        return sum((a[n].double() * moved[n].double()).sum().item() for n in tensors)

    before = similarity()
    order = np.random.default_rng(seed)
    dirty, sweeps = {s.name for s in symmetries}, 0
    while dirty and sweeps < max_sweeps:
        sweeps += 1
        for index in order.permutation(len(symmetries)):
            sym = symmetries[index]
            if sym.name not in dirty:
                continue
            dirty.discard(sym.name)
            correlation = torch.zeros(sym.size, sym.size, dtype=torch.float64)
            for axis in sym.axes:
                if axis.tensor not in a:
                    continue
                other = b[axis.tensor]  # B's tensor with the other symmetries' current transforms
                for other_sym, other_axis in touching[axis.tensor]:
                    if other_sym is not sym:
                        other = _apply_on_axis(other, other_axis, transforms[other_sym.name])
                correlation += (_axis_first(a[axis.tensor], axis) @ _axis_first(other, axis).T).double()
            new = _best_transform(sym, correlation)
            old = transforms[sym.name]
            moved = not torch.equal(new, old) if sym.kind == "permutation" else (new - old).norm() > tolerance
            if moved:
                dirty |= neighbours[sym.name]
            transforms[sym.name] = new
    return MatchResult(transforms, before, similarity(), sweeps, _moved_indices(symmetries, transforms))


def _activation_axes(model: GPT, symmetry: Symmetry) -> list[tuple[str, Axis]]:
    """(linear layer, axis of its input) for every linear layer the symmetry acts on along its input
    axis: the activations on that axis transform as the weights' axis does (z -> M z)."""
    out = []
    for axis in symmetry.axes:
        module_name = axis.tensor.removesuffix(".weight")
        reads_input = axis.dim == 1 and axis.tensor.endswith(".weight")
        if reads_input and isinstance(model.get_submodule(module_name), torch.nn.Linear):
            out.append((module_name, Axis(module_name, 1, axis.groups, axis.block)))
    return out


def _without_row_and_column_means(c: torch.Tensor) -> torch.Tensor:
    return c - c.mean(0, keepdim=True) - c.mean(1, keepdim=True) + c.mean()


@torch.no_grad()
def activation_matching(a: State, b: State, cfg: ModelConfig, symmetries: list[Symmetry],
                        batches: Iterable[torch.Tensor]) -> MatchResult:
    """Transforms of B that maximise Σ ⟨z_A, T(z_B)⟩ over the activations z the symmetries act on,
    summed over every token of `batches` (token ids [batch, time]); equivalently, that minimise
    Σ ||z_A − T(z_B)||². Each symmetry is solved once, from C = Σ z_A z_Bᵀ: B's activations are B's
    own, so one symmetry's transform does not change another's correlation."""
    models = []
    for state in (a, b):
        model = GPT(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in state.items()})
        models.append(model)
    axes = {s.name: _activation_axes(models[0], s) for s in symmetries}
    for s in symmetries:
        if not axes[s.name]:
            raise ModeconnError(f"activation matching: symmetry {s.name} acts on no linear layer's input")
    wanted = {module for pairs in axes.values() for module, _ in pairs}
    captured: list[dict[str, torch.Tensor]] = [{}, {}]  # per model: module -> its input on this batch, [tokens, in]

    def keep_input(store: dict, module: str):
        def hook(_module, inputs):
            store[module] = inputs[0].reshape(-1, inputs[0].shape[-1])
        return hook

    for model, store in zip(models, captured):
        for module in wanted:
            model.get_submodule(module).register_forward_pre_hook(keep_input(store, module))
    correlations = {s.name: torch.zeros(s.size, s.size, dtype=torch.float64) for s in symmetries}
    tokens = 0
    for x in batches:
        for model in models:
            model(x)
        tokens += x.numel()
        for s in symmetries:
            for module, axis in axes[s.name]:
                za, zb = (_axis_first(store[module], axis) for store in captured)
                correlations[s.name] += (za @ zb.T).double()  # fp32 per batch, summed in fp64
    if tokens == 0:
        raise ModeconnError("activation matching: no validation windows to compute activations on")
    # A constant added to a row or a column of C changes the total of every permutation alike (and of
    # every orthogonal map keeping the all-ones direction), so the row and column means are removed:
    # same optimum, and the Hungarian solver is 1.3-2x faster on activation correlations (all
    # positive after GELU, a large common part); on weight correlations it is not, so only here.
    transforms = {s.name: _best_transform(s, _without_row_and_column_means(correlations[s.name]))
                  for s in symmetries}

    def similarity(chosen: dict[str, torch.Tensor]) -> float:
        total = 0.0
        for s in symmetries:
            c, m = correlations[s.name], chosen[s.name]
            total += (c[torch.arange(s.size), m].sum() if m.dim() == 1 else (m * c).sum()).item()
        return total / tokens

    return MatchResult(transforms, similarity({s.name: identity(s) for s in symmetries}), similarity(transforms), 1,
                       _moved_indices(symmetries, transforms))


# --- function-preserving canonical form -----------------------------------------------------------

def untie(state: State, cfg: ModelConfig) -> tuple[State, ModelConfig]:
    """A tied model as an untied one: the head becomes its own copy of the embedding."""
    if not cfg.tie_embeddings:
        return dict(state), cfg
    out = dict(state)
    out["lm_head.weight"] = state["transformer.wte.weight"].clone()
    return out, replace(cfg, tie_embeddings=False)


def fold_layer_norms(state: State, cfg: ModelConfig) -> tuple[State, ModelConfig]:
    """LayerNorm gains (and ln_1, ln_2 biases) folded into the next linear layer; gains become 1.
    Unties a tied model (see the module docstring)."""
    out, cfg = untie(state, cfg)
    out = {k: v.double() for k, v in out.items()}
    readers = [(f"transformer.h.{i}.ln_1", f"transformer.h.{i}.attn.c_attn") for i in range(cfg.n_layer)]
    readers += [(f"transformer.h.{i}.ln_2", f"transformer.h.{i}.mlp.c_fc") for i in range(cfg.n_layer)]
    readers += [("transformer.ln_f", "lm_head")]
    for norm, linear in readers:
        gain, weight = out[norm + ".weight"], out[linear + ".weight"]
        if cfg.bias and linear != "lm_head":  # W(g⊙y + β) + c = (W diag g) y + (Wβ + c)
            out[linear + ".bias"] = out[linear + ".bias"] + weight @ out[norm + ".bias"]
            out[norm + ".bias"] = torch.zeros_like(out[norm + ".bias"])
        elif cfg.bias:  # no head bias to take Wβ: W(g⊙y + β) = (W diag g)(y + β/g)
            if bool((gain == 0).any()):
                raise ModeconnError(f"cannot fold {norm}: its gain has zeros, so its bias cannot move past it")
            out[norm + ".bias"] = out[norm + ".bias"] / gain
        out[linear + ".weight"] = weight * gain
        out[norm + ".weight"] = torch.ones_like(gain)
    return {k: v.float() for k, v in out.items()}, cfg


def centre_residual_writers(state: State, cfg: ModelConfig) -> tuple[State, ModelConfig]:
    """Each vector written into the residual stream made mean-free (see the module docstring).
    Unties a tied model: centring the embedding would otherwise shift the head's logits."""
    out, cfg = untie(state, cfg)
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        out[name] = out[name] - out[name].mean(dim=1, keepdim=True)
    for i in range(cfg.n_layer):
        for proj in (f"transformer.h.{i}.attn.c_proj", f"transformer.h.{i}.mlp.c_proj"):
            out[proj + ".weight"] = out[proj + ".weight"] - out[proj + ".weight"].mean(dim=0, keepdim=True)
            if cfg.bias:
                out[proj + ".bias"] = out[proj + ".bias"] - out[proj + ".bias"].mean()
    return out, cfg


def canonical_form(state: State, cfg: ModelConfig) -> tuple[State, ModelConfig]:
    """Folded and centred: the form in which the residual rotation is a symmetry."""
    return centre_residual_writers(*fold_layer_norms(state, cfg))


# --- aligning one checkpoint to another -------------------------------------------------------------

_NEEDS_WINDOWS = "align.method=activations needs validation windows: give --data.dir"


@dataclass
class AlignConfig:
    # weights: match the weights (no data); activations: match activations on validation windows
    # (align.py's --data, the probe's own data section)
    method: Literal["weights", "activations"] = "weights"
    heads: bool = True  # permute attention heads
    units: bool = True  # permute MLP hidden units
    residual: bool = False  # rotate the residual stream (folds LayerNorms and centres first: both outputs change form)
    max_sweeps: int = 50
    seed: int = 0


def align(a: State, b: State, cfg: ModelConfig, settings: Optional[AlignConfig] = None,
          batches: Optional[Iterable[torch.Tensor]] = None) -> tuple[State, State, ModelConfig, MatchResult]:
    """(A', B', config, result): B transformed to match A. With `residual`, both are first put in
    canonical form (the same functions, other parameters), so A' is returned too. `batches` (token
    ids) are what activation matching runs on."""
    settings = settings or AlignConfig()
    if not (settings.heads or settings.units or settings.residual):
        raise ModeconnError("align: nothing to align (heads, units and residual are all off)")
    if settings.method == "activations" and batches is None:
        raise ConfigError(_NEEDS_WINDOWS)
    if settings.residual:
        (a, _), (b, cfg) = canonical_form(a, cfg), canonical_form(b, cfg)
    symmetries = gpt2_symmetries(cfg, settings.heads, settings.units, settings.residual)
    if settings.method == "activations":
        result = activation_matching(a, b, cfg, symmetries, batches)
    else:
        result = weight_matching(a, b, symmetries, settings.max_sweeps, settings.seed)
    aligned = apply(b, symmetries, result.transforms)
    return a, {k: v.float().contiguous() for k, v in aligned.items()}, cfg, result


# --- checkpoints and the command --------------------------------------------------------------------


def align_checkpoints(reference: Path, checkpoint: Path, out: Path, settings: AlignConfig,
                      reference_out: Optional[Path] = None, data: Optional[DataConfig] = None) -> dict:
    """Write `checkpoint` aligned to `reference` as an export at `out` (its metadata kept, the
    alignment added); with `residual`, the reference in the same canonical form at `reference_out`.
    `data`: the validation windows activation matching runs on. Targets and data are checked before
    any work, and nothing existing is overwritten."""
    if settings.residual and reference_out is None:
        raise ConfigError("align: residual alignment changes the reference's form too; give reference_out")
    if settings.method == "activations" and data is None:
        raise ConfigError(_NEEDS_WINDOWS)
    targets = [Path(t) for t in (out, reference_out) if t is not None]
    with contextlib.ExitStack() as held:
        for target in targets:  # one writer per output
            held.enter_context(lock_for_target(target, "align.py"))
        for target in targets:
            if target.exists():
                raise CheckpointError(f"{target} already exists; refusing to overwrite it")
        return _align_into(Path(reference), Path(checkpoint), Path(out), settings,
                           Path(reference_out) if reference_out else None, data)


def _align_into(reference: Path, checkpoint: Path, out: Path, settings: AlignConfig, reference_out: Optional[Path],
                data: Optional[DataConfig]) -> dict:
    start = time.perf_counter()
    check_compatible([WeightSource(reference), WeightSource(checkpoint)])
    cfg_a, a = load_hf(reference)
    _, b = load_hf(checkpoint)
    batches = None
    if settings.method == "activations":
        val = ValidationSet(TokenWindows(Path(data.dir), "val", cfg_a.block_size), data.val_windows or None)
        batches = [x for x, _ in val.batches(data.eval_batch_size)]
    a_form, aligned, cfg, result = align(a, b, cfg_a, settings, batches)
    report = {"aligned_to": str(reference), "source": str(checkpoint), "settings": config_lib.to_dict(settings),
              "similarity_before": result.similarity_before, "similarity_after": result.similarity_after,
              "sweeps": result.sweeps, "permuted_indices": result.changed,
              "seconds": round(time.perf_counter() - start, 3)}
    save_hf(aligned, cfg, out, metadata={**read_meta(checkpoint), "alignment": report})
    if settings.residual:
        save_hf(a_form, cfg, reference_out, metadata={**read_meta(reference), "canonical_form_of": str(reference)})
    return report


@dataclass
class AlignCommand:
    reference: str = ""  # A: the checkpoint to align to
    checkpoint: str = ""  # B: the checkpoint to transform
    out: str = ""  # where B aligned to A is written
    reference_out: Optional[str] = None  # with align.residual: where A in canonical form is written
    align: AlignConfig = field(default_factory=AlignConfig)
    data: Optional[DataConfig] = None  # with align.method=activations: the validation windows


def main(argv=None) -> None:
    command = config_lib.from_cli(AlignCommand, sys.argv[1:] if argv is None else argv, __doc__)
    for key in ("reference", "checkpoint", "out"):
        if not getattr(command, key):
            raise ConfigError(f"align: --{key} is required")
    report = align_checkpoints(Path(command.reference), Path(command.checkpoint), Path(command.out), command.align,
                               Path(command.reference_out) if command.reference_out else None, command.data)
    print(f"aligned {command.checkpoint} to {command.reference} in {report['seconds']:.1f} s "
          f"({report['sweeps']} sweeps): similarity {report['similarity_before']:.4g} -> "
          f"{report['similarity_after']:.4g}; wrote {command.out}", flush=True)
