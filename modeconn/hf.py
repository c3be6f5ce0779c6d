"""Hugging Face GPT-2 interop: our weights <-> a directory `GPT2LMHeadModel.from_pretrained` loads.

Our parameter names are HF's; what differs is layout:
- HF stores the four block linears as Conv1D, weight [in, out]; we use nn.Linear, [out, in].
- Our embedding may have padding rows (`pad_vocab_to`); HF has exactly `vocab_size` rows.
- A tied model has no `lm_head.weight` in the file (HF re-ties it from `wte`).
- HF GPT-2 always has biases: a bias-free model is written with zero biases (same function).
config.json carries the HF fields plus a `modeconn` block with our full ModelConfig, so that
import gives back exactly the model that was exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from modeconn import config as config_lib
from modeconn.atomic import atomic_dir
from modeconn.errors import CheckpointError, ConfigError
from modeconn.manifest import verify
from modeconn.model import GPT, ModelConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
META_NAME = "modeconn_meta.json"
# Buffers older HF GPT-2 files carry (causal masks); not weights.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF GPT-2 file for `cfg` holds, with its shape (HF layout)."""
    d, f, v = cfg.n_embd, cfg.ffn_width, cfg.vocab_size
    shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (cfg.block_size, d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,),
        })
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF GPT2LMHeadModel tensors (contiguous, unshared, ready for safetensors)."""
    out = {}
    for name, shape in expected_hf_shapes(cfg).items():
        t = state.get(name)
        if t is None:
            if not name.endswith("bias") or cfg.bias:
                raise CheckpointError(f"state dict has no tensor {name!r}")
            t = torch.zeros(shape, dtype=state["transformer.wte.weight"].dtype)  # bias-free model
        t = t.detach()
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        out[name] = t.contiguous().clone()
    return out


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "state dict"
                       ) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors (with or without the `transformer.` prefix) -> our state dict.

    Checks that every expected tensor is present with the right shape, naming `source` and the
    tensor otherwise.
    """
    hf = {normalize_hf_name(k): v for k, v in hf.items() if not is_hf_buffer(k)}
    expected = expected_hf_shapes(cfg)
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some writers store the tied copy; wte is the one we keep
    missing = [k for k in expected if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} for a {cfg.n_layer}-layer GPT-2")
    extra = [k for k in hf if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])} for a "
                              f"{cfg.n_layer}-layer GPT-2 with tie_embeddings={cfg.tie_embeddings}")
    ours = {}
    for name, shape in expected.items():
        t = hf[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} "
                                  f"(HF layout) for the model in its config")
        if name.endswith("bias") and not cfg.bias:
            if torch.count_nonzero(t):
                raise CheckpointError(f"{source}: tensor {name!r} is non-zero but the config says bias: false")
            continue
        ours[name] = hf_tensor_to_ours(name, t, cfg)
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["transformer.wte.weight"]
    return ours


def hf_tensor_to_ours(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """One HF tensor in our layout: Conv1D weights transposed, vocabulary rows padded."""
    if name.endswith(CONV1D_SUFFIXES):
        t = t.t()
    if name in ("transformer.wte.weight", "lm_head.weight") and cfg.padded_vocab_size > cfg.vocab_size:
        t = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, t.shape[1])])
    return t.contiguous()


def is_hf_buffer(name: str) -> bool:
    return name.endswith(_HF_BUFFER_SUFFIXES)


def normalize_hf_name(name: str) -> str:
    """`GPT2Model` files (e.g. the hub's `gpt2`) have no `transformer.` prefix; add it."""
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


def hf_config_dict(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": cfg.activation,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True,
        "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
        "eos_token_id": 50256 if cfg.vocab_size > 50256 else None,
        "torch_dtype": "float32",
        "modeconn": cfg.to_dict(),
    }


_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def model_config_from_hf(hf_cfg: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json: our own block if present, else the HF GPT-2 fields."""
    try:
        if "modeconn" in hf_cfg:
            return config_lib.build(ModelConfig, hf_cfg["modeconn"], "modeconn")
        if hf_cfg.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"model_type is {hf_cfg.get('model_type')!r}, only 'gpt2' is supported")
        for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
            if key in hf_cfg and (not isinstance(hf_cfg[key], int) or isinstance(hf_cfg[key], bool)):
                raise ConfigError(f"{key} must be an integer, got {hf_cfg[key]!r}")
        act = hf_cfg.get("activation_function", "gelu_new")
        if act not in _HF_ACTIVATIONS:
            raise ConfigError(f"activation_function {act!r} is not supported; supported: {', '.join(_HF_ACTIVATIONS)}")
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                        ("scale_attn_weights", True)):
            if hf_cfg.get(key, ok) != ok:
                raise ConfigError(f"{key}={hf_cfg[key]} is not supported (our GPT-2 has {key}={ok})")
        return ModelConfig(
            n_layer=hf_cfg["n_layer"], n_head=hf_cfg["n_head"], n_embd=hf_cfg["n_embd"],
            n_inner=hf_cfg.get("n_inner"), block_size=hf_cfg["n_positions"], vocab_size=hf_cfg["vocab_size"],
            dropout=hf_cfg.get("resid_pdrop", 0.0), activation=_HF_ACTIVATIONS[act],
            tie_embeddings=hf_cfg.get("tie_word_embeddings", True),
            layer_norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
            init_std=hf_cfg.get("initializer_range", 0.02))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # values of the wrong type or range
        raise CheckpointError(f"{source}: not a valid GPT-2 config ({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def save_hf(model_or_state: Union[GPT, Mapping[str, torch.Tensor]], cfg: ModelConfig, out_dir: Path,
            metadata: Optional[Mapping[str, object]] = None, overwrite: bool = False) -> Path:
    """Write `out_dir/model.safetensors` + `config.json` atomically, with a manifest. `metadata`
    (JSON-able values) goes into the safetensors header and `modeconn_meta.json`."""
    with atomic_dir(Path(out_dir), overwrite=overwrite, manifest=True) as tmp:
        write_hf(model_or_state, cfg, tmp, metadata)
    return Path(out_dir)


def write_hf(model_or_state: Union[GPT, Mapping[str, torch.Tensor]], cfg: ModelConfig, directory: Path,
             metadata: Optional[Mapping[str, object]] = None) -> None:
    """The files of `save_hf`, written into an existing directory (the caller makes it atomic)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    tensors = to_hf_state_dict(state, cfg)
    meta = {"format": "pt", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata=meta)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    if metadata:
        (directory / META_NAME).write_text(json.dumps(dict(metadata), indent=2))


def read_meta(path: Path) -> dict:
    """Our metadata of a checkpoint (`modeconn_meta.json`: optimizer, seeds, step, ...); {} for
    checkpoints that have none (Hugging Face's)."""
    path = Path(path)
    meta = (path if path.is_dir() else path.parent) / META_NAME
    if not meta.is_file():
        return {}
    try:
        value = json.loads(meta.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{meta}: expected a JSON object")
    return value


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: one file, a directory with `model.safetensors`, or a
    directory with a sharded index (`model-0000x-of-0000y.safetensors`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (neither a directory nor a .safetensors file)")
    if (path / SAFETENSORS_NAME).is_file():
        return [path / SAFETENSORS_NAME]
    if (path / INDEX_NAME).is_file():
        try:
            index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            if not isinstance(index, dict) or not all(isinstance(f, str) for f in index.values()):
                raise ValueError("weight_map is not a mapping of tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_NAME}: not a safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(index.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path / INDEX_NAME} names {f.name}, which does not exist")
        return files
    raise CheckpointError(f"{path}: no {SAFETENSORS_NAME} or {INDEX_NAME} in this directory")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for k in handle.keys():
                    tensors[k] = handle.get_tensor(k)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); truncated or corrupt?") from None
    return tensors


def checked_weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint (`safetensors_files`), after checking them, its
    config.json and metadata against its manifest where it has one: damage is named before use."""
    files = safetensors_files(path)
    folder = files[0].parent
    verify(folder, [f.name for f in files] + ["config.json", META_NAME, INDEX_NAME])
    return files


def load_hf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GPT-2 checkpoint (ours or any HF GPT-2 directory) -> (config, our state dict)."""
    path = Path(path)
    files = checked_weight_files(path)
    cfg = read_model_config(path)
    return cfg, from_hf_state_dict(read_safetensors(files), cfg, source=str(path))


def read_model_config(path: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint, from the config.json beside its weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; a GPT-2 checkpoint needs its config.json beside the weights")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return model_config_from_hf(hf_cfg, str(cfg_file))


def load_model(path: Path) -> GPT:
    cfg, state = load_hf(path)
    model = GPT(cfg)
    model.load_state_dict(state)
    return model
