"""Optimizer pieces (roles, groups, Lion), schedules, and the generated DeepSpeed config."""

import math

import pytest
import torch

from modeconn.errors import ConfigError
from modeconn.model import GPT, ModelConfig
from modeconn.optim import OptimConfig, build_optimizer, param_groups
from modeconn.optim.lion import Lion
from modeconn.optim.roles import parameter_roles
from modeconn.schedule import ScheduleConfig, lr_multiplier
from modeconn.distributed import strip_launcher_args
from modeconn.train import TrainConfig, deepspeed_config


@pytest.mark.parametrize("tie", [True, False])
def test_roles_by_module(tie):
    model = GPT(ModelConfig.from_preset("tiny", tie_embeddings=tie))
    roles = {name: role for name, _, role in parameter_roles(model)}
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "embedding"
    assert roles["transformer.h.1.attn.c_attn.weight"] == roles["transformer.h.0.mlp.c_proj.weight"] == "matrix"
    assert roles["transformer.h.0.ln_1.weight"] == roles["transformer.ln_f.weight"] == "norm"
    assert roles["transformer.h.0.attn.c_attn.bias"] == roles["transformer.ln_f.bias"] == "bias"
    assert ("lm_head.weight" in roles) == (not tie)  # a tied head is the embedding, listed once
    if not tie:
        assert roles["lm_head.weight"] == "head"
    assert len(roles) == len(list(model.parameters()))


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_no_weight_decay_on_gains_and_biases(decay_embeddings):
    model = GPT(ModelConfig.from_preset("tiny"))
    groups = param_groups(model, OptimConfig(weight_decay=0.1, decay_embeddings=decay_embeddings))
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert all(n.endswith("bias") or ".ln_" in n or "wte" in n or "wpe" in n for n in plain)
    assert "transformer.h.0.ln_1.weight" in plain and "transformer.h.0.mlp.c_fc.bias" in plain
    assert "transformer.h.0.mlp.c_fc.weight" in decayed and "lm_head.weight" in decayed
    assert ("transformer.wte.weight" in decayed) == decay_embeddings
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lion_matches_its_definition():
    torch.manual_seed(0)
    p0, g1, g2 = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    lr, (b1, b2), wd = 0.01, (0.9, 0.99), 0.1
    p = torch.nn.Parameter(p0.clone())
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    expected, m = p0.clone(), torch.zeros_like(p0)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        expected = expected * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    assert torch.allclose(p.detach(), expected, atol=1e-7)
    assert torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-7)


def test_lion_is_elementwise_so_flat_partitions_give_the_same_update():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(7))
    flat = torch.nn.Parameter(torch.cat([a.detach().flatten(), b.detach()]))
    opt, opt_flat = Lion([a, b], lr=0.1, weight_decay=0.2), Lion([flat], lr=0.1, weight_decay=0.2)
    for _ in range(3):
        ga, gb = torch.randn(4, 3), torch.randn(7)
        a.grad, b.grad, flat.grad = ga, gb, torch.cat([ga.flatten(), gb])
        opt.step(), opt_flat.step()
    assert torch.equal(torch.cat([a.detach().flatten(), b.detach()]), flat.detach())


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lion", Lion)])
def test_build_optimizer(name, cls):
    opt = build_optimizer(GPT(ModelConfig.from_preset("tiny")), OptimConfig(name=name, lr=0.01))
    assert isinstance(opt, cls) and all(g["initial_lr"] == 0.01 for g in opt.param_groups)
    if name == "adamw":
        assert opt.defaults["fused"]  # torch's fused kernel on CPU and CUDA


def test_schedules():
    total = 100
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cos, 0, total) == pytest.approx(0.1)  # linear warm-up from 1/10
    assert lr_multiplier(cos, 9, total) == pytest.approx(1.0)
    assert lr_multiplier(cos, 10, total) == pytest.approx(1.0)
    mid = 10 + (total - 10) // 2
    assert lr_multiplier(cos, mid, total) == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)
    assert lr_multiplier(cos, total, total) == pytest.approx(0.1)
    lin = ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_multiplier(lin, 50, total) == pytest.approx(0.5)
    const = ScheduleConfig(kind="constant", warmup_fraction=0.05)
    assert lr_multiplier(const, 2, total) == pytest.approx(3 / 5) and lr_multiplier(const, 99, total) == 1.0
    wsd = ScheduleConfig(kind="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_multiplier(wsd, s, total) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(wsd, 90, total) == pytest.approx(0.5)
    assert lr_multiplier(wsd, total, total) == pytest.approx(0.0)
    values = [lr_multiplier(cos, s, total) for s in range(10, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
    with pytest.raises(ConfigError):
        ScheduleConfig(min_lr_ratio=2.0)


def test_deepspeed_config_from_yaml_sections():
    cfg = TrainConfig()
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.grad_clip = 4, 3, 0.5
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 3, "bf16"
    cfg.deepspeed.overrides = {"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # merged, not replaced
    assert ds["bf16"] == {"enabled": True} and ds["wall_clock_breakdown"] is True
    cfg.deepspeed.overrides = {"train_micro_batch_size_per_gpu": 8}
    with pytest.raises(ConfigError, match="set train.micro_batch"):
        deepspeed_config(cfg, 1)


def test_launcher_arguments_are_dropped():
    assert strip_launcher_args(["--local_rank=1", "--config", "x.yaml", "--local_rank", "0", "--a=1"]) == [
        "--config", "x.yaml", "--a=1"]


def test_cosine_never_goes_below_its_floor():
    cos = ScheduleConfig(kind="cosine", warmup_fraction=0.0, min_lr_ratio=0.2)
    assert min(lr_multiplier(cos, s, 50) for s in range(60)) >= 0.2 - 1e-12
    assert not math.isnan(lr_multiplier(cos, 0, 1))
