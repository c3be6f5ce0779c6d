"""GPT-2's symmetries: every transform keeps the function (our model, and Hugging Face's loading
the transformed export); weight and activation matching undo a known permutation and rotation;
aligning two independently initialised runs lowers the barrier between them (weights, and
activations through align.py); align.py and probe's align switch."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from modeconn import align as al
from modeconn.hf import load_hf, save_hf
from modeconn.model import GPT, ModelConfig
from bigram_runs import BLOCK, CONFIG, VOCAB, bigram_sequences, train_runs
from train_runner import env as subprocess_env


def _model(tie: bool, bias: bool = True, seed: int = 0) -> GPT:
    cfg = ModelConfig.from_preset("tiny", n_embd=32, n_head=4, n_inner=64, vocab_size=101, block_size=16,
                                  tie_embeddings=tie, bias=bias, pad_vocab_to=8)
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # gains, biases and weights away from their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _logits(state, cfg, x):
    model = GPT(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)[0]


def _random_transforms(symmetries, gen):
    out = {}
    for sym in symmetries:
        if sym.kind == "permutation":
            out[sym.name] = torch.randperm(sym.size, generator=gen)
        else:  # an orthogonal map keeping the all-ones direction
            basis = al._complement_basis(sym.size)
            q, _ = torch.linalg.qr(torch.randn(sym.size - 1, sym.size - 1, generator=gen, dtype=torch.float64))
            out[sym.name] = basis @ q @ basis.T + torch.full((sym.size, sym.size), 1.0 / sym.size, dtype=torch.float64)
    return out


@pytest.mark.parametrize("tie, bias", [(True, True), (False, True), (False, False)])
def test_every_transform_preserves_the_function(tie, bias, tmp_path):
    model = _model(tie, bias)
    cfg, state = model.config, model.state_dict()
    x = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = _logits(state, cfg, x)
    gen = torch.Generator().manual_seed(2)

    folded, folded_cfg = al.fold_layer_norms(state, cfg)
    assert folded_cfg.tie_embeddings is False
    assert all(torch.equal(folded[f"transformer.h.{i}.ln_1.weight"], torch.ones(32)) for i in range(2))
    centred, canonical_cfg = al.centre_residual_writers(folded, folded_cfg)
    assert centred["transformer.wte.weight"].mean(dim=1).abs().max() < 1e-6
    permuted_only = al.apply(state, al.gpt2_symmetries(cfg), _random_transforms(al.gpt2_symmetries(cfg), gen))
    symmetries = al.gpt2_symmetries(canonical_cfg, residual=True)
    everything = al.apply(centred, symmetries, _random_transforms(symmetries, gen))
    for name, (s, c) in {"fold": (folded, folded_cfg), "centre": (centred, canonical_cfg),
                         "heads and units": (permuted_only, cfg), "all, with rotation": (everything, canonical_cfg)}.items():
        assert (_logits(s, c, x) - reference).abs().max() < 1e-4, name
    assert not torch.allclose(everything["transformer.h.0.mlp.c_fc.weight"], state["transformer.h.0.mlp.c_fc.weight"])

    # Hugging Face's GPT-2, loading the transformed export, computes the original function too
    from transformers import GPT2LMHeadModel

    save_hf(everything, canonical_cfg, tmp_path / "transformed")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "transformed").eval()
    with torch.no_grad():
        assert (hf(x).logits - reference[..., : cfg.vocab_size]).abs().max() < 1e-4


def test_weight_matching_recovers_a_known_permutation_and_rotation():
    model = _model(tie=False)
    cfg, state = model.config, model.state_dict()
    symmetries = al.gpt2_symmetries(cfg)
    scrambled = al.apply(state, symmetries, _random_transforms(symmetries, torch.Generator().manual_seed(3)))
    result = al.weight_matching(state, scrambled, symmetries)
    recovered = al.apply(scrambled, symmetries, result.transforms)
    assert all(torch.equal(recovered[k], state[k]) for k in state)  # exactly: heads and units back in place
    assert sum(result.changed.values()) > 0 and result.similarity_after > result.similarity_before

    canonical, canonical_cfg = al.canonical_form(state, cfg)
    symmetries = al.gpt2_symmetries(canonical_cfg, residual=True)
    scrambled = al.apply(canonical, symmetries, _random_transforms(symmetries, torch.Generator().manual_seed(4)))
    result = al.weight_matching(canonical, scrambled, symmetries)
    recovered = al.apply(scrambled, symmetries, result.transforms)
    assert max((recovered[k] - canonical[k]).abs().max().item() for k in canonical) < 1e-5


def test_activation_matching_recovers_a_known_permutation_and_rotation():
    """B is A with its heads, units (and residual stream) transformed: B's activations are A's,
    transformed, so matching them on a few batches finds the inverse."""
    model = _model(tie=False)
    cfg, state = model.config, model.state_dict()
    batches = [torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    symmetries = al.gpt2_symmetries(cfg)
    scrambled = al.apply(state, symmetries, _random_transforms(symmetries, torch.Generator().manual_seed(3)))
    result = al.activation_matching(state, scrambled, cfg, symmetries, batches)
    recovered = al.apply(scrambled, symmetries, result.transforms)
    assert all(torch.equal(recovered[k], state[k]) for k in state)
    assert sum(result.changed.values()) > 0 and result.similarity_after > result.similarity_before

    canonical, canonical_cfg = al.canonical_form(state, cfg)
    symmetries = al.gpt2_symmetries(canonical_cfg, residual=True)
    scrambled = al.apply(canonical, symmetries, _random_transforms(symmetries, torch.Generator().manual_seed(4)))
    result = al.activation_matching(canonical, scrambled, canonical_cfg, symmetries, batches)
    recovered = al.apply(scrambled, symmetries, result.transforms)
    assert max((recovered[k] - canonical[k]).abs().max().item() for k in canonical) < 1e-5


# --- two independently initialised runs on a learnable task ----------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    runs, data_dir = train_runs(root, (0, 1))
    return root, CONFIG, runs, data_dir


def _midpoint_barrier(a, b, cfg) -> float:
    x = torch.from_numpy(bigram_sequences(99, 256))
    losses = []
    for t in (0.0, 0.5, 1.0):
        model = GPT(cfg)
        model.load_state_dict({k: (1 - t) * a[k] + t * b[k] for k in a})
        with torch.no_grad():
            losses.append(model(x[:, :-1], x[:, 1:])[1].item())
    return losses[1] - 0.5 * (losses[0] + losses[2])


def test_alignment_lowers_the_barrier_between_independent_runs(two_runs):
    _, cfg, runs, _ = two_runs
    (_, a), (_, b) = load_hf(runs["seed0"]), load_hf(runs["seed1"])
    before = _midpoint_barrier(a, b, cfg)
    a_form, b_aligned, form_cfg, result = al.align(a, b, cfg, al.AlignConfig(residual=True))
    after = _midpoint_barrier(a_form, b_aligned, form_cfg)
    print(f"midpoint loss barrier: {before:.4f} before, {after:.4f} after alignment ({result.sweeps} sweeps)")
    assert before > 0.1 and after < 0.5 * before


def test_align_command_and_probe_switch(two_runs, tmp_path):
    root, cfg, runs, data_dir = two_runs
    env = subprocess_env()
    command = [sys.executable, "align.py", f"--reference={runs['seed0']}", f"--checkpoint={runs['seed1']}",
               f"--out={tmp_path / 'b'}", "--align.residual=true", f"--reference_out={tmp_path / 'a'}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "b" / "modeconn_meta.json").read_text())
    assert meta["optimizer"] == "adamw" and meta["alignment"]["similarity_after"] > meta["alignment"]["similarity_before"]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists; refusing to overwrite" in again.stderr

    # Activation matching on 32 validation windows of the task's data
    by_activations = command[:4] + [f"--out={tmp_path / 'b-act'}", "--align.residual=true",
                                    f"--reference_out={tmp_path / 'a-act'}", "--align.method=activations"]
    no_data = subprocess.run(by_activations, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert no_data.returncode == 2 and "needs validation windows: give --data.dir" in no_data.stderr
    assert not (tmp_path / "b-act").exists()
    done = subprocess.run(by_activations + [f"--data.dir={data_dir}", "--data.val_windows=32"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "b-act" / "modeconn_meta.json").read_text())["alignment"]["settings"]["method"] == "activations"
    (_, a), (_, b) = load_hf(runs["seed0"]), load_hf(runs["seed1"])
    (_, a_form), (form_cfg, b_aligned) = load_hf(tmp_path / "a-act"), load_hf(tmp_path / "b-act")
    before, after = _midpoint_barrier(a, b, cfg), _midpoint_barrier(a_form, b_aligned, form_cfg)
    print(f"midpoint loss barrier: {before:.4f} before, {after:.4f} after activation matching")
    assert after < 0.5 * before

    deeper_cfg = ModelConfig.from_preset("tiny", n_layer=3, n_embd=32, n_head=4, n_inner=128, vocab_size=VOCAB,
                                         block_size=BLOCK)
    save_hf(GPT(deeper_cfg), deeper_cfg, tmp_path / "deeper")
    bad = subprocess.run(command[:3] + [f"--checkpoint={tmp_path / 'deeper'}", f"--out={tmp_path / 'c'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "different models (n_layer: 2 vs 3)" in bad.stderr and not (tmp_path / "c").exists()

    out = tmp_path / "probe"
    args = {"runs": json.dumps({k: str(v) for k, v in runs.items()}), "data.dir": data_dir, "data.val_windows": 64,
            "t_values": "[0.0, 0.5, 1.0]", "out_dir": out, "plots": "false", "spectra.enabled": "false",
            "align.residual": "true", "align.method": "activations"}  # on the probe's own validation windows
    probe = subprocess.run([sys.executable, "probe.py"] + [f"--{k}={v}" for k, v in args.items()], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    rows = {(r["path"], r["t"]): r["loss"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    plain = rows[("seed0--seed1", 0.5)] - 0.5 * (rows[("seed0--seed1", 0.0)] + rows[("seed0--seed1", 1.0)])
    aligned = rows[("seed0--seed1:aligned", 0.5)] - 0.5 * (rows[("seed0--seed1:aligned", 0.0)]
                                                           + rows[("seed0--seed1:aligned", 1.0)])
    assert abs(rows[("seed0--seed1:aligned", 0.0)] - rows[("seed0--seed1", 0.0)]) < 1e-4  # canonical A: same function
    assert aligned < 0.5 * plain
    assert "adamw--adamw, aligned" in (out / "summary.csv").read_text()
