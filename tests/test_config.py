"""Typed configs: YAML + dotted overrides, strict errors, saved configs that load back equal."""

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from conftest import ROOT
from modeconn import config as config_lib
from modeconn.config import load, parse_overrides
from modeconn.data.prepare import PrepareConfig
from modeconn.errors import ConfigError
from modeconn.evaluate import EvaluateConfig
from modeconn.model import ModelConfig


@dataclass
class Inner:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    kind: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    name: Optional[str] = None
    flag: bool = False
    extra: dict = field(default_factory=dict)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "inner:\n  lr: 3e-4\n  kind: sgd\nsteps: 5\n")
    cfg = load(Outer, *parse_overrides(["--config", path, "--steps=7", "--inner.betas", "[0.8, 0.99]",
                                        "--flag=true", "--name", "run-1", "--extra={a: 1}"]))
    assert cfg == Outer(inner=Inner(lr=3e-4, betas=[0.8, 0.99], kind="sgd"), steps=7, name="run-1",
                        flag=True, extra={"a": 1})
    assert load(Outer, *parse_overrides(["--name=null"])).name is None


@pytest.mark.parametrize("yaml_text, message", [
    ("stepz: 3\n", r"unknown config key 'stepz' \(did you mean 'steps'\?\); valid keys under the top level: "
                   r"inner, steps, name, flag, extra"),
    ("inner:\n  learning_rate: 1\n", r"unknown config key 'inner.learning_rate'; valid keys under inner: lr, betas, kind"),
    ("steps: ten\n", r"config key 'steps' expects an integer, got 'ten'"),
    ("steps: 1.5\n", r"config key 'steps' expects an integer, got 1.5"),
    ("flag: maybe\n", r"config key 'flag' expects true or false"),
    ("inner:\n  kind: lion\n", r"config key 'inner.kind': 'lion' is not a valid choice; valid choices: adamw, sgd"),
    ("inner: 3\n", r"config key 'inner' expects a mapping of lr, betas, kind"),
    ("inner:\n  betas: [0.9, fast]\n", r"config key 'inner.betas\[1\]' expects a number"),
    ("- a\n- b\n", r"must hold a mapping at the top level"),
])
def test_errors_name_the_key_and_the_choices(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        load(Outer, write(tmp_path, yaml_text))


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr' \(did you mean 'inner.lr'\?\)"):
        load(Outer, *parse_overrides(["--inner.lrr=1"]))
    with pytest.raises(ConfigError, match="config key 'steps' expects an integer, got 'abc'"):
        load(Outer, *parse_overrides(["--steps", "abc"]))
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--steps"])
    with pytest.raises(ConfigError, match="unexpected argument 'steps=3'"):
        parse_overrides(["steps=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, str(tmp_path / "missing.yaml"))


def test_model_presets_in_configs(tmp_path):
    cfg = load(ModelConfig, write(tmp_path, "preset: paper-small\ndropout: 0.0\n"))
    assert cfg == ModelConfig.from_preset("paper-small", dropout=0.0)
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'; valid presets: gpt2, gpt2-medium"):
        load(ModelConfig, write(tmp_path, "preset: gpt3\n"))
    with pytest.raises(ConfigError, match=r"model.n_embd=100 is not divisible by model.n_head=12"):
        load(ModelConfig, write(tmp_path, "preset: gpt2\nn_embd: 100\n"))
    with pytest.raises(ConfigError, match=r"'activation': 'relu' is not a valid choice; valid choices: gelu, gelu_new"):
        load(ModelConfig, write(tmp_path, "activation: relu\n"))


@pytest.mark.parametrize("cls, argv", [
    (EvaluateConfig, ["--model.preset=paper-small", "--model.n_layer=3", "--data.val_windows=5", "--seed.init=4"]),
    (PrepareConfig, ["--source.kind=files", "--source.paths=[a.txt, b/*.jsonl]", "--val_fraction=0.1"]),
])
def test_saved_config_loads_back_equal(tmp_path, cls, argv):
    cfg = load(cls, *parse_overrides(argv))
    config_lib.save(cfg, tmp_path / "resolved.yaml")
    assert load(cls, str(tmp_path / "resolved.yaml")) == cfg


def test_command_line_error_exits_nonzero_with_one_line():
    proc = subprocess.run([sys.executable, "prepare.py", "--val_fractoin=0.1"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'val_fractoin' (did you mean 'val_fraction'?); valid keys under the top level: "
        "source, tokenizer, out_dir, val_fraction, split_seed, shard_tokens, workers, batch_documents, overwrite"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_load(path):
    from modeconn.train import TrainConfig

    cfg = load(TrainConfig, str(path))
    assert cfg.out_dir.endswith(path.stem) and (cfg.optim.name == "muon") == ("muon" in path.stem)
