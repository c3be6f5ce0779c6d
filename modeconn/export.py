"""Consolidated exports of a DeepSpeed-trained model, at any ZeRO stage.

An export is a Hugging Face GPT-2 directory (`modeconn.hf.save_hf`: model.safetensors +
config.json) with our metadata (`modeconn_meta.json`: optimizer, seeds, step, val loss, ...), and
optionally `trainer_state/`: the full fp32 optimizer state per parameter name and the position of
the data loader. Nothing in it depends on the number of ranks, so a run can resume from an export
at another world size.

Full tensors are assembled with DeepSpeed's fragment helpers (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`), which are collective: every rank calls these functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param,
                             safe_get_full_optimizer_state, safe_set_full_optimizer_state)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modeconn.atomic import atomic_dir, move_aside_damaged
from modeconn.distributed import World, decided_on_rank0
from modeconn.errors import CheckpointError
from modeconn.hf import SAFETENSORS_NAME, read_meta, to_hf_state_dict, write_hf
from modeconn.manifest import verify
from modeconn.model import ModelConfig
from modeconn.optim.roles import parameter_roles
from modeconn.optim.zero_layout import flat_partitions, partition_param_group, zero3_partitioned

TRAINER_STATE = "trainer_state"
_TRAINER_STATE_KEYS = ("step", "tokens", "loader", "optimizer", "state_keys")


def _client_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the state: ZeRO and bf16 wrappers keep it as `.optimizer`."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


def _link_state_fragments(engine) -> None:
    """Point every parameter's ZeRO fragment at its slice of the optimizer state.

    The ZeRO-1/2 and bf16 wrappers link the state once, right after stepping the first parameter
    group, when the other groups have no state yet; their parameters stay unlinked (DeepSpeed
    0.19.8). Linking again, with DeepSpeed's own function, is idempotent and covers every group.
    """
    opt, state = engine.optimizer, _client_optimizer(engine).state
    pairs = []
    if hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        pairs = zip(opt.bit16_groups, opt.single_partition_of_fp32_groups)
    elif hasattr(opt, "bf16_groups") and hasattr(opt, "fp32_groups_flat_partition"):  # bf16 at ZeRO-0
        pairs = zip(opt.bf16_groups, opt.fp32_groups_flat_partition)
    for lp_params, flat_hp in pairs:
        if flat_hp in state:
            lazy_init_hp_params_optimizer_state(lp_params, flat_hp, state)


def _ensure_state(engine, keys_by_name: dict[str, tuple[str, ...]], step: int) -> None:
    """Create zero optimizer state where there is none yet (before the first step), so that a
    resumed run can overwrite it: on each flat partition, its parameter group's keys; `step` feeds
    AdamW's bias correction."""
    client = _client_optimizer(engine)
    for index, flat in enumerate(flat_partitions(engine)):
        group = client.param_groups[partition_param_group(engine, index)]
        keys = keys_by_name[group["names"][0]]
        for key in keys:
            client.state[flat].setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
        if "exp_avg_sq" in keys:  # AdamW
            client.state[flat]["step"] = torch.tensor(float(step), device=flat.device)


def _full_param(p: torch.nn.Parameter) -> torch.Tensor:
    full = safe_get_full_fp32_param(p)
    return (full if full is not None else p.detach()).float().cpu()


def _full_state(engine, p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    """The full state tensor `key` of `p`; None where this parameter has no such state (Muon keeps
    a momentum on its matrices and AdamW's moments on the other parameters)."""
    full = safe_get_full_optimizer_state(p, key)
    if full is None:  # ZeRO-0 fp32: the client optimizer holds state per parameter
        full = _client_optimizer(engine).state[p].get(key)
    return None if full is None else full.float().cpu()


def gather_weights(model) -> dict[str, torch.Tensor]:
    """Full fp32 weights by our parameter names (a tied weight once). Collective; every rank gets them."""
    return {name: _full_param(p) for name, p, _ in parameter_roles(model)}


def gather_optimizer_state(engine, model, keys_by_name: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """{"name::key": full fp32 state tensor}; a key this parameter does not have yet (before the first
    step at ZeRO-0) is left out. Collective."""
    _link_state_fragments(engine)
    full = {f"{name}::{key}": _full_state(engine, p, key)
            for name, p, _ in parameter_roles(model) for key in keys_by_name[name]}
    return {k: v for k, v in full.items() if v is not None}


def export(engine, model, model_cfg: ModelConfig, out: Path, world: World, metadata: dict,
           optimizer_keys: Optional[dict[str, tuple[str, ...]]] = None, trainer_state: Optional[dict] = None,
           overwrite: bool = False) -> str:
    """Collective. Rank 0 writes `out` (atomically, with a manifest); with `optimizer_keys`
    ({parameter name: state keys}), also trainer_state/. Returns "written", or "kept" when `out`
    already held these very weights (a run resumed from before an export it had written: the
    export is reused). An existing `out` with other weights is an error naming both; one that is
    damaged is moved aside (kept) and written anew."""
    weights = gather_weights(model)
    optim = gather_optimizer_state(engine, model, optimizer_keys) if optimizer_keys else None

    def write() -> str:
        state = dict(weights)
        if model_cfg.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        if out.exists() and not overwrite and _holds_same_weights(out, state, model_cfg, metadata):
            return "kept"
        with atomic_dir(out, overwrite=overwrite, manifest=True) as tmp:  # a replaced export goes only once whole
            write_hf(state, model_cfg, tmp, metadata)
            if optim is not None:
                (tmp / TRAINER_STATE).mkdir()
                save_file(optim, str(tmp / TRAINER_STATE / "optimizer.safetensors"))
                (tmp / TRAINER_STATE / "state.json").write_text(json.dumps(trainer_state or {}, indent=2))
        return "written"

    return decided_on_rank0(world, write)


def _holds_same_weights(out: Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig, metadata: dict) -> bool:
    """True if the export `out` holds exactly these weights. False, after moving it aside, if it
    is damaged. CheckpointError, naming both, if it holds other weights."""
    try:
        verify(out)
        existing = load_file(str(out / SAFETENSORS_NAME))
    except (CheckpointError, SafetensorError, OSError) as e:
        aside = move_aside_damaged(out)
        print(f"warning: {out} is damaged ({e}); kept as {aside}, writing it again", file=sys.stderr, flush=True)
        return False
    ours = to_hf_state_dict(state, model_cfg)
    differ = sorted(k for k in ours.keys() | existing.keys()
                    if k not in ours or k not in existing or not torch.equal(ours[k], existing[k]))
    if not differ:
        return True
    def describe(meta: dict) -> str:
        if not meta:
            return "no modeconn_meta.json"
        return ", ".join(f"{k}={meta.get(k)}" for k in ("optimizer", "seed_init", "seed_data", "step"))

    theirs = read_meta(out)
    raise CheckpointError(f"{out} already exists with other weights than this run's at step {metadata.get('step')} "
                          f"({differ[0]} differs{f' and {len(differ) - 1} more' if len(differ) > 1 else ''}; "
                          f"that export: {describe(theirs)}; this run: {describe(metadata)}). Move it away or "
                          f"choose another out_dir; nothing was overwritten")


def read_trainer_state(export_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    state_file = Path(export_dir) / TRAINER_STATE / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{export_dir} has no {TRAINER_STATE}/state.json: it is a weights-only export. "
                              f"Use it with init.from (fresh optimizer), or export with checkpoint.export_optimizer")
    verify(export_dir)
    tensors_file = Path(export_dir) / TRAINER_STATE / "optimizer.safetensors"
    try:
        state = json.loads(state_file.read_text())
        missing = [k for k in _TRAINER_STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{state_file}: not a trainer state ({e})") from None
    try:
        return state, load_file(str(tensors_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{tensors_file}: not a readable safetensors file ({e})") from None


def load_optimizer_state(engine, model, tensors: dict[str, torch.Tensor], keys_by_name: dict[str, tuple[str, ...]],
                         step: int, source: str) -> None:
    """Set full per-parameter optimizer state (as written by `export`) into the engine's optimizer."""
    opt = _client_optimizer(engine)
    partitioned = flat_partitions(engine) is not None
    if partitioned:
        _ensure_state(engine, keys_by_name, step)
        _link_state_fragments(engine)
    for name, p, _ in parameter_roles(model):
        keys = keys_by_name[name]
        present = [key for key in keys if f"{name}::{key}" in tensors]
        if not present:
            raise CheckpointError(f"{source}: optimizer state has no tensor for {name!r} "
                                  f"(expected {' or '.join(f'{name}::{k}' for k in keys)})")
        for key in present:
            value = tensors[f"{name}::{key}"].to(p.device)
            if zero3_partitioned(p):
                _set_zero3_state(engine.optimizer, p, value, key)
            elif hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, value, key)
            else:
                opt.state[p][key] = value.clone()
                if key == "exp_avg_sq":  # AdamW's bias correction counts steps
                    opt.state[p]["step"] = torch.tensor(float(step))


def _set_zero3_state(zero3, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's slice of a full state tensor into ZeRO-3's partition. DeepSpeed's own setter
    (0.19.8) reads past the end of the tensor on the last rank when the parameter does not divide
    evenly over the ranks; here the last slice is cut at the end and its padding left alone."""
    part, _ = zero3._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero3._get_param_partition_rank(p)
    n = max(0, min(part.numel(), value.numel() - start))
    part[:n].copy_(value.flatten()[start:start + n])
