"""Checkpoints opened memory-mapped, and path points built from them one tensor at a time.

A `WeightSource` is a GPT-2 checkpoint (our export, any HF GPT-2 directory, a sharded index, or a
.safetensors file with config.json beside it) opened with safetensors' memory map: names and
shapes come from the file headers; a tensor is read only when asked for. `check_compatible`
compares sources before anything is evaluated, so a bad pair fails at once, naming the file and
the tensor. `load_point` writes θ = Σ c_i θ_i into one resident model parameter by parameter: the
only full copy of the weights is the model's own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open

from modeconn.atomic import atomic_dir
from modeconn.errors import CheckpointError
from modeconn.hf import (META_NAME, SAFETENSORS_NAME, checked_weight_files, expected_hf_shapes, hf_config_dict,
                         hf_tensor_to_ours, is_hf_buffer, normalize_hf_name, read_model_config)
from modeconn.model import GPT, ModelConfig

# Settings that do not change the function a checkpoint computes at evaluation (a preset's name,
# dropout, the init scale, embedding padding rows; n_inner None and 4d are the same width).
_IRRELEVANT_TO_EVALUATION = ("preset", "dropout", "init_std", "pad_vocab_to", "n_inner")


class WeightSource:
    """One checkpoint, memory-mapped. `tensor(name)` reads one tensor (HF name and layout) as fp32.

    Its files are mapped while they are read and unmapped by `release()` (mapped again at the
    next read): the pages a mapping has touched count in the process's resident memory, so a batch
    over many checkpoints releases the ones the current point does not use and stays flat in RSS.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config: ModelConfig = read_model_config(self.path)
        self._where: dict[str, tuple[Path, str]] = {}  # HF name -> (file, key in it)
        self._handles: dict[Path, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in checked_weight_files(self.path):
            handle = self._open(f)
            for key in handle.keys():
                if not is_hf_buffer(key):
                    self._where[normalize_hf_name(key)] = (f, key)
                    self.shapes[normalize_hf_name(key)] = tuple(handle.get_slice(key).get_shape())
        if self.config.tie_embeddings:  # some writers store the tied copy; wte is the one
            self._where.pop("lm_head.weight", None)
            self.shapes.pop("lm_head.weight", None)
        self.release()

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e}); truncated or corrupt?") from None
        return self._handles[f]

    def tensor(self, name: str) -> torch.Tensor:
        f, key = self._where[name]
        try:
            return self._open(f).get_tensor(key).float()
        except SafetensorError as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from None

    def release(self) -> None:
        """Unmap the files (their pages leave this process's resident memory)."""
        self._handles.clear()

    def __repr__(self) -> str:
        return f"WeightSource({self.path})"


def _evaluation_config(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for key in _IRRELEVANT_TO_EVALUATION:
        d.pop(key, None)
    d["ffn_width"] = cfg.ffn_width
    return d


def check_compatible(sources: Sequence[WeightSource]) -> ModelConfig:
    """Every source holds the same architecture with every tensor, at the right shape; the
    first source's config (the one to evaluate with) is returned. Raises CheckpointError naming
    the file and the setting or tensor at fault."""
    first = sources[0]
    reference = _evaluation_config(first.config)
    for s in sources[1:]:
        other = _evaluation_config(s.config)
        differ = [k for k in reference if reference[k] != other.get(k)]
        if differ:
            detail = ", ".join(f"{k}: {reference[k]} vs {other.get(k)}" for k in differ)
            raise CheckpointError(f"{s.path} and {first.path} are different models ({detail})")
    expected = expected_hf_shapes(first.config)
    for s in sources:
        missing = [k for k in expected if k not in s.shapes]
        if missing:
            raise CheckpointError(f"{s.path}: missing tensor(s) {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}")
        extra = [k for k in s.shapes if k not in expected]
        if extra:
            raise CheckpointError(f"{s.path}: unexpected tensor(s) {', '.join(extra[:5])} for this GPT-2 config")
        for name, shape in expected.items():
            if s.shapes[name] != shape:
                raise CheckpointError(f"{s.path}: tensor {name!r} has shape {s.shapes[name]}, expected {shape} "
                                      f"(HF layout)")
    return first.config


def weighted_sum(terms: Iterable[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Σ c_i x_i, summed in the order given (so a point equals its formula exactly)."""
    total = None
    for tensor, c in terms:
        term = tensor * c
        total = term if total is None else total.add_(term)
    return total


def combine(sources: Sequence[WeightSource], coefficients: Sequence[tuple[int, float]], name: str) -> torch.Tensor:
    """Σ c_i θ_i[name] in fp32 from the checkpoints."""
    return weighted_sum((sources[index].tensor(name), c) for index, c in coefficients)


@torch.no_grad()
def load_point(model: GPT, sources: Sequence[WeightSource], coefficients: Sequence[tuple[int, float]]) -> None:
    """Write the path point Σ c_i θ_i into `model`, one tensor at a time (HF layout converted to ours)."""
    cfg = model.config
    params = dict(model.named_parameters())
    for name in expected_hf_shapes(cfg):
        if name.endswith("bias") and not cfg.bias:
            continue
        params[name].copy_(hf_tensor_to_ours(name, combine(sources, coefficients, name), cfg))


def write_point(sources: Sequence[WeightSource], coefficients: Sequence[tuple[int, float]], target: Path,
                metadata: dict) -> Path:
    """Write the point Σ c_i θ_i as a checkpoint directory (model.safetensors + config.json +
    modeconn_meta.json), one tensor in memory at a time: the safetensors header is built from the
    sources' shapes first, then each tensor's bytes follow it in header order. Atomic: a
    directory appears complete or not at all; an existing one is refused."""
    cfg = sources[0].config
    names = sorted(expected_hf_shapes(cfg))
    header, offset = {}, 0
    for name in names:
        shape = sources[0].shapes[name]
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **{k: json.dumps(v) for k, v in metadata.items()}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with atomic_dir(Path(target), manifest=True) as tmp:
        with open(tmp / SAFETENSORS_NAME, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name in names:
                f.write(combine(sources, coefficients, name).contiguous().numpy().astype("<f4", copy=False).data)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
        (tmp / META_NAME).write_text(json.dumps(metadata, indent=2))
    return Path(target)
