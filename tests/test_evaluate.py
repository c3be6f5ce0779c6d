"""evaluate.py end to end: a fresh tiny GPT-2 on Shakespeare, checked against HF on the same windows."""

import json
import math

import pytest

from modeconn.config import DataConfig
from modeconn.data.prepare import TokenizerConfig
from modeconn.errors import ModeconnError
from modeconn.evaluate import EvaluateConfig, run


def test_evaluate_fresh_tiny_model(tmp_path, shakespeare, bpe_file):
    cfg = EvaluateConfig(data=DataConfig(dir=str(shakespeare), val_windows=16), out_dir=str(tmp_path / "ev"),
                         tokenizer=TokenizerConfig(bpe_file=bpe_file), sample_tokens=8)
    results = run(cfg)
    ours, theirs = results["validation"], results["validation_hf"]
    assert ours["tokens"] == 16 * 64
    assert abs(ours["loss"] - math.log(50257)) < 0.05  # an untrained model is near-uniform
    assert abs(ours["loss"] - theirs["loss"]) < 1e-5 and ours["errors"] == theirs["errors"]
    assert results["sample"].startswith("ROMEO:")
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["validation"] == ours
    # The export it wrote evaluates to the same numbers when read back as init_from.
    again = run(EvaluateConfig(init_from=str(tmp_path / "ev" / "hf"), data=cfg.data, tokenizer=cfg.tokenizer,
                               out_dir=str(tmp_path / "ev2"), check_hf=False, sample_tokens=8))
    assert again["validation"] == ours
    with pytest.raises(ModeconnError, match="already exists"):
        run(cfg)
