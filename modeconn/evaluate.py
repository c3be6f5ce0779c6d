"""Evaluate one GPT-2 on the fixed validation windows, sample from it, and check it against
Hugging Face: export it, load the export with `GPT2LMHeadModel`, and evaluate that too.

    python evaluate.py --config configs/eval/tiny.yaml
    python evaluate.py --init_from=out/some-export --data.dir=data/shakespeare
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from modeconn import config as config_lib
from modeconn.atomic import atomic_dir
from modeconn.config import DataConfig, SeedConfig
from modeconn.data.loader import TokenWindows, ValidationSet
from modeconn.data.tokenizer import gpt2_tokenizer
from modeconn.data.prepare import TokenizerConfig
from modeconn.errors import ModeconnError
from modeconn.hf import load_model, save_hf
from modeconn.lock import lock_for_target
from modeconn.metrics import evaluate_lm
from modeconn.model import GPT, ModelConfig


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    init_from: Optional[str] = None  # an export / HF GPT-2 directory; else a fresh init from seed.init
    data: DataConfig = field(default_factory=DataConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prompt: str = "ROMEO:"
    sample_tokens: int = 48
    check_hf: bool = True  # export, reload with transformers.GPT2LMHeadModel, evaluate again
    out_dir: str = "out/evaluate"
    overwrite: bool = False


def run(cfg: EvaluateConfig) -> dict:
    with lock_for_target(Path(cfg.out_dir), "evaluate.py"):
        out = Path(cfg.out_dir)
        if out.exists() and not cfg.overwrite:  # before any work
            raise ModeconnError(f"{out} already exists; refusing to overwrite it (pass --overwrite=true or choose "
                                f"another out_dir)")
        return _evaluate(cfg)


def _evaluate(cfg: EvaluateConfig) -> dict:
    torch.manual_seed(cfg.seed.init)
    if cfg.init_from:
        model = load_model(Path(cfg.init_from))
        model_cfg, source = model.config, cfg.init_from
    else:
        model_cfg, model = cfg.model, GPT(cfg.model)
        source = f"fresh init (preset {model_cfg.preset}, seed.init={cfg.seed.init})"
    model.eval()
    print(f"model: {source}; {model.num_parameters() / 1e6:.2f}M parameters, {model_cfg.n_layer} layers, "
          f"d={model_cfg.n_embd}, context {model_cfg.block_size}")

    val = ValidationSet(TokenWindows(Path(cfg.data.dir), "val", model_cfg.block_size), cfg.data.val_windows or None)
    start = time.perf_counter()
    ours = evaluate_lm(lambda x: model(x)[0], val.batches(cfg.data.eval_batch_size))
    print(f"validation ({len(val)} windows, {ours['tokens']:,} tokens): loss {ours['loss']:.4f} nats, "
          f"token error {ours['token_error']:.4f} ({time.perf_counter() - start:.1f} s)")

    enc = gpt2_tokenizer(cfg.tokenizer.bpe_file)
    prompt = torch.tensor([enc.encode_ordinary(cfg.prompt)])
    gen = torch.Generator().manual_seed(cfg.seed.data)
    sample = enc.decode(model.generate(prompt, cfg.sample_tokens, top_k=200, generator=gen)[0].tolist())
    print(f"sample:\n{sample}\n")

    results = {"model": source, "parameters": model.num_parameters(), "validation": ours, "sample": sample}
    with atomic_dir(Path(cfg.out_dir), overwrite=cfg.overwrite) as tmp:
        config_lib.save(cfg, tmp / "config.yaml")
        if cfg.check_hf:
            from transformers import GPT2LMHeadModel

            save_hf(model, model_cfg, tmp / "hf")
            hf = GPT2LMHeadModel.from_pretrained(tmp / "hf").eval()
            theirs = evaluate_lm(lambda x: hf(x).logits, val.batches(cfg.data.eval_batch_size))
            results["validation_hf"] = theirs
            print(f"same weights in transformers.GPT2LMHeadModel: loss {theirs['loss']:.4f}, token error "
                  f"{theirs['token_error']:.4f} (difference {abs(theirs['loss'] - ours['loss']):.2e} nats)")
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {cfg.out_dir}/config.yaml, results.json" + (", hf/ (a GPT2LMHeadModel directory)" if cfg.check_hf else ""))
    return results


def main(argv=None) -> None:
    run(config_lib.from_cli(EvaluateConfig, argv, __doc__))
