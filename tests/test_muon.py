"""Muon against oracles nobody here wrote: torch.optim.Muon (+ torch.optim.AdamW), and the
Newton–Schulz polynomial evaluated exactly on the singular values (float64 SVD)."""

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from modeconn.errors import ConfigError
from modeconn.model import GPT, ModelConfig
from modeconn.optim import OptimConfig, build_optimizer, describe_routing
from modeconn.optim.muon import MuonConfig, orthogonalise, resolve_dtype
from modeconn.optim.newton_schulz import (DEFAULT_COEFFICIENTS, gram_newton_schulz, newton_schulz, ns_multiply_adds,
                                          update_scale)
from modeconn.optim.roles import parameter_roles


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 40)])
def test_bf16_newton_schulz_is_torchs_bit_for_bit(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, 5, DEFAULT_COEFFICIENTS, 1e-7, torch.bfloat16)
    assert torch.equal(ours, _zeropower_via_newtonschulz(g, DEFAULT_COEFFICIENTS, 5, 1e-7))


@pytest.mark.parametrize("shape", [(32, 32), (24, 64), (64, 24)])
def test_fp32_newton_schulz_is_the_polynomial_of_the_singular_values(shape):
    """NS acts on singular values only: U diag(p(p(...p(s / ||s||)))) V^T, p(x) = a x + b x^3 + c x^5."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    a, b, c = DEFAULT_COEFFICIENTS
    x = s / s.norm()
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    expected = u @ torch.diag(x) @ vh
    ours = newton_schulz(g.float(), 5, DEFAULT_COEFFICIENTS, 1e-7, torch.float32).double()
    assert (ours - expected).norm() / expected.norm() < 1e-5


def _ns_polynomial_of_singular_values(g: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    a, b, c = DEFAULT_COEFFICIENTS
    x = s / s.norm()
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    return u @ torch.diag(x) @ vh


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (40, 200)])
def test_gram_newton_schulz_is_the_same_polynomial(shape):
    """The Gram form computes the same iteration: in fp32 as close to the exact polynomial as the
    standard form; in fp16 (its GPU dtype) closer than the standard form in bf16."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    g = g * torch.logspace(0, -3, shape[1])  # a decaying spectrum, as gradients have
    expected = _ns_polynomial_of_singular_values(g)

    def error(fn, dtype):
        return ((fn(g, 5, DEFAULT_COEFFICIENTS, 1e-7, dtype).double() - expected).norm() / expected.norm()).item()

    assert error(gram_newton_schulz, torch.float32) < 1e-5
    assert error(gram_newton_schulz, torch.float16) < error(newton_schulz, torch.bfloat16)


def test_gram_form_only_where_it_saves_work():
    assert ns_multiply_adds(256, 1024, 5, "gram") < 0.75 * ns_multiply_adds(256, 1024, 5)
    assert ns_multiply_adds(256, 256, 5, "gram") == ns_multiply_adds(256, 256, 5)
    gram = MuonConfig(ns_method="gram")
    square, wide = torch.randn(32, 32), torch.randn(32, 128)
    assert torch.equal(orthogonalise(square, gram, torch.float32), newton_schulz(square))
    assert torch.equal(orthogonalise(wide, gram, torch.float32), gram_newton_schulz(wide))
    assert not torch.equal(gram_newton_schulz(wide), newton_schulz(wide))
    assert resolve_dtype(gram, torch.device("cuda")) == torch.float16
    assert resolve_dtype(MuonConfig(), torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(gram, torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="ns_method gram needs ns_dtype"):
        MuonConfig(ns_method="gram", ns_dtype="bfloat16")


def test_update_scales():
    assert update_scale(1024, 256, "original") == 2.0 and update_scale(256, 1024, "original") == 1.0
    assert update_scale(256, 1024, "match_rms_adamw") == pytest.approx(0.2 * 32)
    assert update_scale(1024, 256, "spectral") == 2.0 and update_scale(256, 1024, "spectral") == 0.5


def test_routing_is_by_role():
    model = GPT(ModelConfig.from_preset("tiny", tie_embeddings=False))
    opt = build_optimizer(model, OptimConfig(name="muon"))
    muon_names = {n for g in opt.param_groups if g["use_muon"] for n in g["names"]}
    assert muon_names == {n for n, _, role in parameter_roles(model) if role == "matrix"}
    aux = {n for g in opt.param_groups if not g["use_muon"] for n in g["names"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= aux  # not by name substrings
    text = describe_routing(opt)
    assert "muon: lr" in text and "adamw: lr" in text and "12 matrices orthogonalised separately" in text


def clone_pair(cfg: ModelConfig):
    torch.manual_seed(0)
    a = GPT(cfg)
    b = GPT(cfg)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("scale", ["original", "match_rms_adamw"])
def test_muon_with_aux_adamw_equals_torch_over_50_steps(scale):
    """Our optimizer (bf16 NS, the oracle's dtype; c_attn as one matrix, as torch sees it) against
    torch.optim.Muon on the block matrices + torch.optim.AdamW on the rest, step by step."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, tie_embeddings=False)
    ours_model, ref_model = clone_pair(cfg)
    opt_cfg = OptimConfig(name="muon", lr=0.02, weight_decay=0.1, decay_embeddings=True,
                          muon=MuonConfig(ns_dtype="bfloat16", scale=scale, split_qkv=False))
    ours = build_optimizer(ours_model, opt_cfg)
    roles = {n: r for n, _, r in parameter_roles(ref_model)}
    params = dict(ref_model.named_parameters())
    matrices = [p for n, p in params.items() if roles[n] == "matrix"]
    decayed = [p for n, p in params.items() if roles[n] in ("embedding", "head")]
    plain = [p for n, p in params.items() if roles[n] in ("norm", "bias")]
    ref_muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                adjust_lr_fn=scale)
    aux = opt_cfg.aux
    ref_adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": aux.weight_decay},
                                   {"params": plain, "weight_decay": 0.0}], lr=aux.lr, betas=tuple(aux.betas),
                                  eps=aux.eps, fused=True)  # the kernel our AdamW side calls
    gen = torch.Generator().manual_seed(2)
    for step in range(50):
        x = torch.randint(0, 512, (4, 33), generator=gen)
        for model in (ours_model, ref_model):
            model(x[:, :-1], x[:, 1:])[1].backward()
        ours.step(), ref_muon.step(), ref_adamw.step()
        for opt in (ours, ref_muon, ref_adamw):
            opt.zero_grad(set_to_none=True)
        for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
            err = ((p - q).norm() / q.norm()).item()
            assert err <= 1e-6, (step, name, err)


def test_split_qkv_equals_torch_muon_on_separate_q_k_v():
    """With split_qkv, c_attn's update is torch.optim.Muon's on three separate [d, d] matrices."""
    torch.manual_seed(3)
    d = 32
    w = torch.nn.Parameter(torch.randn(3 * d, d) * 0.02)
    parts = [torch.nn.Parameter(w.detach()[i * d:(i + 1) * d].clone()) for i in range(3)]
    from modeconn.optim.muon import Muon, MuonGroup, muon_matrices

    cfg = MuonConfig(ns_dtype="bfloat16", split_qkv=True)
    ours = Muon([MuonGroup(["h.0.attn.c_attn.weight"], [w], lr=0.02, weight_decay=0.1,
                           matrices=[muon_matrices("h.0.attn.c_attn.weight", (3 * d, d), 4, cfg)])], cfg)
    ref = torch.optim.Muon(parts, lr=0.02, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(3 * d, d)
        w.grad = g.clone()
        for i, p in enumerate(parts):
            p.grad = g[i * d:(i + 1) * d].clone()
        ours.step(), ref.step()
    assert torch.equal(w.detach(), torch.cat([p.detach() for p in parts]))


def test_split_heads_orthogonalises_each_head():
    from modeconn.optim.muon import muon_matrices

    cfg = MuonConfig(split_qkv=True, split_heads=True)
    slices = muon_matrices("transformer.h.0.attn.c_attn.weight", (3 * 64, 64), 4, cfg)
    assert [(m.row_start, m.row_end) for m in slices] == [(16 * i, 16 * (i + 1)) for i in range(12)]
    assert muon_matrices("transformer.h.0.mlp.c_fc.weight", (256, 64), 4, cfg)[0].rows == 256


# --- the trainer with Muon: resume, another world size, bf16 ----------------------------------------

# No accumulation and no clipping: then every ZeRO stage sums gradients alike and the runs of all
# stages are bit-identical, so one straight run is the reference for all of them.
MUON_RUN = {"optim.name": "muon", "optim.lr": 0.02, "train.steps": 8, "train.micro_batch": 6, "train.grad_clip": 0,
            "checkpoint.every": 0}


@pytest.fixture(scope="module")
def muon_straight(shakespeare, tmp_path_factory):
    from train_runner import losses, train

    out = tmp_path_factory.mktemp("muon") / "straight"
    proc = train(shakespeare, out, nproc=2, **MUON_RUN, **{"deepspeed.zero_stage": 1})
    assert "muon: lr 0.02" in proc.stdout and "matrices orthogonalised separately" in proc.stdout
    straight = losses(out)
    assert straight[8] < straight[1] - 0.3
    return out


@pytest.mark.parametrize("stage", [0, 3])
def test_muon_stop_and_resume_is_bit_exact_at_every_stage(shakespeare, tmp_path, muon_straight, stage):
    from train_runner import assert_same_weights, losses, train

    out = tmp_path / "stopped"
    run = dict(MUON_RUN, **{"deepspeed.zero_stage": stage})
    train(shakespeare, out, nproc=2, **run, **{"train.stop_at_step": 4})
    resumed = train(shakespeare, out, nproc=2, resume="auto", **run)
    assert "at step 4" in resumed.stdout
    assert losses(out) == losses(muon_straight)
    assert_same_weights(out / "final", muon_straight / "final")


def test_muon_resumes_from_an_export_at_another_world_size(shakespeare, tmp_path, muon_straight):
    """4 steps at 2 ranks (ZeRO-2), exported with the Muon momentum and AdamW moments per parameter
    name; resumed at 2 ranks it is bit-identical to the straight run; at 3 ranks (ZeRO-3, cuts at
    other places) the momentum arrives whole and training continues alike."""
    from safetensors.torch import load_file
    from train_runner import assert_same_weights, losses, train

    train(shakespeare, tmp_path / "first", nproc=2, **dict(MUON_RUN, **{"deepspeed.zero_stage": 2, "train.steps": 4}))
    export = tmp_path / "first" / "final"
    state = load_file(str(export / "trainer_state" / "optimizer.safetensors"))
    assert "transformer.h.0.mlp.c_fc.weight::momentum_buffer" in state
    assert "transformer.wte.weight::exp_avg" in state and "transformer.wte.weight::momentum_buffer" not in state

    train(shakespeare, tmp_path / "same", nproc=2, resume=str(export), **dict(MUON_RUN, **{"deepspeed.zero_stage": 2}))
    straight = losses(muon_straight)
    assert losses(tmp_path / "same") == {s: straight[s] for s in (5, 6, 7, 8)}
    assert_same_weights(tmp_path / "same" / "final", muon_straight / "final")

    three = {"deepspeed.zero_stage": 3, "train.micro_batch": 4}  # the same global batch of 12 windows
    train(shakespeare, tmp_path / "three", nproc=3, resume=str(export), **dict(MUON_RUN, **three))
    for step, loss in losses(tmp_path / "three").items():
        assert loss == pytest.approx(straight[step], rel=1e-5), step
    # Loaded at 3 ranks and exported again at once, the state is the exported one, bit for bit.
    train(shakespeare, tmp_path / "reexport", nproc=3, resume=str(export), **dict(MUON_RUN, **three, **{"train.steps": 4}))
    again = load_file(str(tmp_path / "reexport" / "final" / "trainer_state" / "optimizer.safetensors"))
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_muon_bf16_run_resumes(shakespeare, tmp_path):
    """bf16 weights, fp32 master partitions and momentum (ZeRO-1): stopped and resumed without a dtype error."""
    from train_runner import losses, train, weights

    run = dict(MUON_RUN, **{"deepspeed.precision": "bf16", "deepspeed.zero_stage": 1, "train.steps": 3,
                            "train.micro_batch": 2, "data.val_windows": 4, "data.eval_batch_size": 2})
    out = tmp_path / "run"
    train(shakespeare, out, nproc=2, **run, **{"train.stop_at_step": 2})
    resumed = train(shakespeare, out, nproc=2, resume="auto", **run)
    assert "at step 2" in resumed.stdout and sorted(losses(out)) == [1, 2, 3]
    assert {t.dtype for t in weights(out / "final").values()} == {torch.float32}


def test_muon_with_offload_is_refused_clearly(shakespeare, tmp_path):
    from train_runner import train

    proc = train(shakespeare, tmp_path / "run", launcher="python", check=False,
                 **{"optim.name": "muon", "deepspeed.zero_stage": 2,
                    "deepspeed.overrides": "{zero_optimization: {offload_optimizer: {device: cpu}}}"})
    assert proc.returncode == 2 and "optim.name=muon does not run with ZeRO offload" in proc.stderr
