"""Paths as coefficients over their points; streamed path points against their formulas; barriers."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeconn.barrier import barriers
from modeconn.errors import CheckpointError, ConfigError, ModeconnError
from modeconn.hf import load_hf, save_hf
from modeconn.model import GPT, ModelConfig
from modeconn.paths import WeightPath, Plane, axis_grid, plane_coefficients, star, t_grid
from modeconn.stream import WeightSource, check_compatible, load_point


def test_coefficients_follow_the_documented_t_convention():
    line = WeightPath("linear", ("A", "B"))
    assert line.coefficients(0.0) == [(0, 1.0), (1, 0.0)] and line.coefficients(1.0) == [(0, 0.0), (1, 1.0)]
    chain = WeightPath("chain", ("A", "bend", "B"))
    assert chain.coefficients(0.5) == [(1, 1.0), (2, 0.0)]  # one bend: at t = 0.5
    assert chain.coefficients(0.25) == [(0, 0.5), (1, 0.5)] and chain.coefficients(1.0) == [(1, 0.0), (2, 1.0)]
    two_bends = WeightPath("chain", ("A", "b1", "b2", "B"))
    assert [i for i, _ in two_bends.coefficients(0.5)] == [1, 2]
    bezier = WeightPath("bezier", ("A", "C", "B"))
    assert bezier.coefficients(0.5) == [(0, 0.25), (1, 0.5), (2, 0.25)]
    assert [p.points for p in star("c", ["a1", "a2", "a3"])] == [("c", "a1"), ("c", "a2"), ("c", "a3")]
    assert plane_coefficients(0.0, 0.0) == [(0, 1.0), (1, 0.0), (2, 0.0)]
    assert t_grid(0.1) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert axis_grid(-0.25, 1.25, 7) == [-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert Plane(("A", "B", "C")).coefficients(0.25, 0.5) == [(0, 0.25), (1, 0.25), (2, 0.5)]


@pytest.mark.parametrize("kind, points, message", [
    ("linear", ("A",), "a linear path needs 2 points"), ("bezier", ("A", "B"), "3 points"),
    ("chain", ("A", "B"), "3 or more points"), ("circle", ("A", "B"), "unknown path kind 'circle'")])
def test_bad_paths_are_refused(kind, points, message):
    with pytest.raises(ConfigError, match=message):
        WeightPath(kind, points)
    with pytest.raises(ConfigError, match="outside"):
        WeightPath("linear", ("A", "B")).coefficients(1.5)
    with pytest.raises(ConfigError, match="does not divide"):
        t_grid(0.3)
    with pytest.raises(ConfigError, match="a plane needs 3 points"):
        Plane(("A", "B"))
    with pytest.raises(ConfigError, match="2 or more points"):
        axis_grid(0.0, 1.0, 1)


def _checkpoints(tmp_path, n: int, **cfg_overrides):
    cfg = ModelConfig.from_preset("tiny", n_embd=32, n_head=2, n_inner=64, vocab_size=101, block_size=16,
                                  **cfg_overrides)
    dirs = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = GPT(cfg)
        with torch.no_grad():
            for p in model.parameters():  # biases and gains away from their init constants
                p.add_(torch.randn_like(p) * 0.01)
        save_hf(model, cfg, tmp_path / f"run{seed}")
        dirs.append(tmp_path / f"run{seed}")
    return cfg, dirs


@pytest.mark.parametrize("tie, pad", [(False, 1), (True, 64)])
def test_streamed_points_equal_their_formulas_exactly(tmp_path, tie, pad):
    cfg, dirs = _checkpoints(tmp_path, 3, tie_embeddings=tie, pad_vocab_to=pad)
    sources = [WeightSource(d) for d in dirs]
    assert check_compatible(sources) == cfg
    a, c, b = (load_hf(d)[1] for d in dirs)  # in memory, the naive way
    model = GPT(cfg)
    for t in (0.0, 0.3, 0.7, 1.0):
        load_point(model, sources, WeightPath("linear", ("A", "B")).coefficients(t))
        for name, p in model.named_parameters():
            assert torch.equal(p, (1 - t) * a[name] + t * c[name]), (t, name)
        load_point(model, sources, WeightPath("bezier", ("A", "C", "B")).coefficients(t))
        for name, p in model.named_parameters():
            assert torch.equal(p, (1 - t) ** 2 * a[name] + 2 * t * (1 - t) * c[name] + t ** 2 * b[name]), (t, name)


def test_bad_checkpoints_fail_before_evaluation_naming_file_and_tensor(tmp_path):
    cfg, (a, b) = _checkpoints(tmp_path, 2)
    _, (deeper,) = _checkpoints(tmp_path / "deep", 1, n_layer=3)
    with pytest.raises(CheckpointError, match=rf"{deeper}.* different models \(n_layer: 3 vs 2\)"):
        check_compatible([WeightSource(deeper), WeightSource(a)])

    tensors = load_file(str(b / "model.safetensors"))
    tensors.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{b / 'model.safetensors'}: .* the manifest says"):
        WeightSource(b)  # our export: its manifest finds the rewritten file before anything is read
    for checkpoint in (a, b):  # from here on, as Hugging Face directories (no manifest)
        (checkpoint / "modeconn_manifest.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{b}: missing tensor\(s\) transformer.h.1.mlp.c_fc.weight"):
        check_compatible([WeightSource(a), WeightSource(b)])

    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 63)
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \(32, 63\), expected \(32, 64\)"):
        check_compatible([WeightSource(a), WeightSource(b)])

    data = (a / "model.safetensors").read_bytes()
    (a / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{a / 'model.safetensors'}: not a readable safetensors file"):
        WeightSource(a)


def test_barrier_of_a_known_bump_is_found_exactly():
    ts = t_grid(0.1)
    line = [2.0 + 1.0 * t for t in ts]  # endpoint values 2 and 3
    bumped = [v + (0.5 if t == 0.3 else 0.1 if t == 0.6 else 0.0) for t, v in zip(ts, line)]
    b = barriers(ts, bumped)
    assert b["linear"] == pytest.approx(0.5, abs=1e-12) and b["linear_t"] == 0.3
    assert b["mean"] == pytest.approx(max(bumped) - 2.5, abs=1e-12) and b["mean_t"] == 1.0
    assert b["linear_normalised"] == pytest.approx(0.5 / 2.5)
    flat = barriers(ts, line)
    assert flat["linear"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ModeconnError, match="increasing t from 0 to 1"):
        barriers([0.0, 0.5], [1.0, 2.0])


def test_a_convex_model_has_no_linear_barrier():
    """Logistic regression: two different minimisers (different inits and data orders); the loss is
    convex in the weights, so along the segment it lies below the line between the end values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=gen)
    y = (x @ torch.randn(10, generator=gen) + 0.5 * torch.randn(400, generator=gen) > 0).float()
    loss = torch.nn.BCEWithLogitsLoss()
    ends = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(10, generator=g) * 3).requires_grad_()
        opt = torch.optim.SGD([w], lr=0.5)
        for _ in range(50):
            idx = torch.randperm(400, generator=g)[:64]
            opt.zero_grad()
            loss(x[idx] @ w, y[idx]).backward()
            opt.step()
        ends.append(w.detach())
    assert (ends[0] - ends[1]).norm() > 1.0  # genuinely different points
    ts = t_grid(0.05)
    values = [loss(x @ ((1 - t) * ends[0] + t * ends[1]), y).item() for t in ts]
    assert barriers(ts, values)["linear"] <= 1e-6


def test_spectra_of_a_matrix_with_known_singular_values():
    from modeconn.spectra import spectrum_distance, summarize

    s = torch.tensor([4.0, 2.0, 2.0, 1.0] + [0.5] * 16)
    summary = summarize(s)
    assert summary["spectral_norm"] == 4.0
    assert summary["stable_rank"] == pytest.approx((16 + 4 + 4 + 1 + 16 * 0.25) / 16)
    assert summary["condition"] == pytest.approx(4.0 / 0.5)
    p = s.double() / s.sum()
    assert summary["effective_rank"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
    assert summarize(torch.ones(10))["effective_rank"] == pytest.approx(10.0)  # flat spectrum: full rank
    assert spectrum_distance(s * 1.1, s) == pytest.approx(0.1)

    from modeconn.spectra import singular_values
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    w = (q[:, :8] * torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1], dtype=torch.float64)) @ r.T
    model = GPT(ModelConfig.from_preset("tiny", n_layer=1, n_embd=8, n_head=2, n_inner=20, vocab_size=50,
                                        block_size=8))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.copy_(w.float())
    got = singular_values(model)["h.0.fc"]
    assert torch.allclose(got, torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1]), atol=1e-5)


def test_q_k_v_split_matches_gpt2s_layout(tmp_path):
    """Our q, k, v matrices, applied to x, give what HF's GPT-2 attention splits its c_attn output into."""
    from transformers import GPT2LMHeadModel

    from modeconn.spectra import weight_matrices

    cfg, (d,) = _checkpoints(tmp_path, 1)
    model = GPT(cfg)
    model.load_state_dict(load_hf(d)[1])
    hf = GPT2LMHeadModel.from_pretrained(d)
    x = torch.randn(3, cfg.n_embd)
    hf_q, hf_k, hf_v = hf.transformer.h[1].attn.c_attn(x).split(cfg.n_embd, dim=-1)
    mats, bias = weight_matrices(model), model.transformer.h[1].attn.c_attn.bias
    n = cfg.n_embd
    for ours, theirs, b in ((mats["h.1.q"], hf_q, bias[:n]), (mats["h.1.k"], hf_k, bias[n:2 * n]),
                            (mats["h.1.v"], hf_v, bias[2 * n:])):
        assert torch.allclose(x @ ours.T + b, theirs, atol=1e-6)
