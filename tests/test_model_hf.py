"""Our GPT-2 against Hugging Face's GPT2LMHeadModel: same function, lossless conversion."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from modeconn.errors import CheckpointError, ModeconnError
from modeconn.hf import from_hf_state_dict, hf_config_dict, load_hf, load_model, save_hf
from modeconn.model import GPT, PRESETS, ModelConfig

VOCAB = 50257


def hf_model(cfg: ModelConfig, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised HF GPT-2 whose biases and gains are non-trivial too."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in hf_config_dict(cfg).items() if k != "modeconn"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
@pytest.mark.parametrize("pad", [1, 64])
def test_logits_equal_hf(tie, activation, pad):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=tie, activation=activation, pad_vocab_to=pad)
    theirs = hf_model(cfg)
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), cfg))
    if tie:
        assert ours.lm_head.weight is ours.transformer.wte.weight
    x = torch.randint(0, VOCAB, (2, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, ours_loss = ours(x[:, :-1], x[:, 1:])
        hf_logits = theirs(x[:, :-1]).logits
    assert ours_logits.shape == hf_logits.shape == (2, cfg.block_size - 1, VOCAB)
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-5
    expected_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert abs(ours_loss.item() - expected_loss.item()) <= 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_ours_to_hf_round_trip_is_exact(tmp_path, tie):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=tie, pad_vocab_to=64)
    original = hf_model(cfg, seed=3)
    original.save_pretrained(tmp_path / "hf_original")  # written by transformers itself

    model_cfg, state = load_hf(tmp_path / "hf_original")
    assert model_cfg.tie_embeddings == tie
    ours = GPT(model_cfg)
    ours.load_state_dict(state)
    save_hf(ours, model_cfg, tmp_path / "ours_export")

    back = GPT2LMHeadModel.from_pretrained(tmp_path / "ours_export")
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert back.config.tie_word_embeddings == tie
    assert (back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()) == tie


@pytest.mark.parametrize("tie", [True, False])
def test_ours_export_import_keeps_config_and_weights(tmp_path, tie):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=tie, bias=False, pad_vocab_to=64, activation="gelu")
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    save_hf(ours, cfg, tmp_path / "export", metadata={"step": 7, "optimizer": "adamw"})
    assert json.loads((tmp_path / "export" / "modeconn_meta.json").read_text()) == {"step": 7, "optimizer": "adamw"}

    again = load_model(tmp_path / "export")
    assert again.config == cfg
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v[: cfg.vocab_size], v2[: cfg.vocab_size]), k

    # A bias-free model is written with zero biases, which HF loads as the same function.
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    x = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() <= 1e-5


def test_reads_gpt2model_layout_without_prefix(tmp_path):
    """The hub's `gpt2` files have GPT2Model keys (`h.0.attn...`, no `transformer.`) and mask buffers."""
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=True)
    theirs = hf_model(cfg)
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in theirs.state_dict().items()
               if k != "lm_head.weight"}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (tmp_path / "gpt2").mkdir()
    save_file(tensors, str(tmp_path / "gpt2" / "model.safetensors"))
    hf_cfg = {k: v for k, v in hf_config_dict(cfg).items() if k != "modeconn"}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(hf_cfg))
    ours = load_model(tmp_path / "gpt2").eval()
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() <= 1e-5


def test_sharded_hf_directory(tmp_path):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=False)
    theirs = hf_model(cfg)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path / "sharded").eval()
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() <= 1e-5


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    save_hf(GPT(cfg), cfg, tmp_path / "good")
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()

    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    (tmp_path / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"truncated/model\.safetensors.*truncated or corrupt"):
        load_hf(tmp_path / "truncated")

    other = ModelConfig.from_preset("tiny", n_embd=32)
    save_hf(GPT(other), other, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"other/config\.json: checksum differs from the manifest"):
        load_hf(tmp_path / "other")  # our export: its manifest finds the swapped file
    (tmp_path / "other" / "modeconn_manifest.json").unlink()  # as a Hugging Face directory (no manifest)
    with pytest.raises(CheckpointError, match=r"other.*'transformer\.wte\.weight' has shape \(50257, 32\)"):
        load_hf(tmp_path / "other")

    state = GPT(cfg).state_dict()
    del state["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        save_hf(state, cfg, tmp_path / "missing")

    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError, match=r"noconfig/config\.json: missing"):
        load_hf(tmp_path / "noconfig")


def test_export_never_overwrites_silently(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    save_hf(GPT(cfg), cfg, tmp_path / "export")
    before = (tmp_path / "export" / "model.safetensors").read_bytes()
    torch.manual_seed(1)
    with pytest.raises(ModeconnError, match="already exists"):
        save_hf(GPT(cfg), cfg, tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind


# Parameter counts of the released GPT-2 checkpoints (tied; position embeddings included).
HF_PARAMETER_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                       "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        n = GPT(cfg).num_parameters(exclude_position_embeddings=False)
    if preset in HF_PARAMETER_COUNTS:
        assert n == HF_PARAMETER_COUNTS[preset]
    d, f, L, V, T = cfg.n_embd, cfg.ffn_width, cfg.n_layer, cfg.padded_vocab_size, cfg.block_size
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    assert n == V * d * (1 if cfg.tie_embeddings else 2) + T * d + L * per_block + 2 * d


def test_paper_small_is_the_seed_study_setup():
    cfg = ModelConfig.from_preset("paper-small")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.ffn_width, cfg.block_size) == (6, 256, 4, 1024, 256)
    assert (cfg.tie_embeddings, cfg.dropout, cfg.activation) == (False, 0.1, "gelu_new")


def test_init_scales_residual_projections():
    cfg = ModelConfig.from_preset("tiny", n_layer=8, n_embd=256, n_inner=1024)
    torch.manual_seed(0)
    model = GPT(cfg)
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(fc - 0.02) < 1e-3
    assert abs(proj - 0.02 / (2 * 8) ** 0.5) < 2e-4
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones(256))


def test_dropout_only_in_training():
    cfg = ModelConfig.from_preset("tiny", dropout=0.5)
    model = GPT(cfg)
    x = torch.randint(0, VOCAB, (1, 16))
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_activation_checkpointing_changes_nothing_but_memory():
    cfg = ModelConfig.from_preset("tiny", n_layer=3)
    x = torch.randint(0, VOCAB, (2, 32))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.checkpoint_blocks = checkpointed
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
