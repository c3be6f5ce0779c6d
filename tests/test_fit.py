"""Path fitting through train.py: a fitted bend lowers the barrier of the straight line between two
independently initialised runs; a star centre (Muon, ZeRO-2, 2 ranks) lowers the centre-to-anchor
barriers below the anchor-to-anchor ones; ZeRO-3 fits what ZeRO-0 and ZeRO-2 fit; a stopped fit
resumes bit-exactly (ZeRO-3); bad settings fail."""

import csv
import dataclasses
import json
import subprocess

import pytest
import torch

from bigram_runs import CONFIG, train_runs
from conftest import ROOT
from modeconn.fit import PathFitConfig, PathPoint
from modeconn.hf import load_hf
from modeconn.paths import WeightPath
from train_runner import assert_same_weights, command, env, losses, metrics, train, weights

FIT = {"train.steps": 100, "train.micro_batch": 16, "train.log_every": 25, "optim.weight_decay": 0,
       "schedule.kind": "cosine", "checkpoint.every": 0, "data.val_windows": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    found, data_dir = train_runs(root, (0, 1, 2))
    return root, {k: str(v) for k, v in found.items()}, data_dir


def _barriers(out, data_dir, **spec) -> dict[str, float]:
    args = {"data.dir": data_dir, "data.val_windows": 64, "spectra.enabled": "false", "plots": "false",
            "out_dir": out, **{k: json.dumps(v) for k, v in spec.items()}}
    proc = subprocess.run(command(1, "python", "probe.py") + [f"--{k}={v}" for k, v in args.items()], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "summary.csv") as f:
        return {row["path"]: float(row["loss_barrier"]) for row in csv.DictReader(f)}


def _two_run_point(runs, kind: str, cfg=CONFIG) -> tuple[PathPoint, list[dict]]:
    """A path point between the runs of init seeds 0 and 1, and those runs' weights."""
    _, found, _ = runs
    frozen = [load_hf(found[s])[1] for s in ("seed0", "seed1")]
    return PathPoint(PathFitConfig(kind, [found["seed0"], found["seed1"]]), cfg, frozen, seed=0, rank=0), frozen


def test_the_free_point_is_trained_through_its_coefficient_only(runs):
    point, frozen = _two_run_point(runs, "bezier")
    for name, p in point.named_parameters():  # starts on the straight line: the endpoints' mean
        assert torch.allclose(p, 0.5 * (frozen[0][name] + frozen[1][name]))
    weights = point.weights_at(WeightPath("bezier", ("A", "free", "B")), 0.3)
    name = "transformer.h.1.mlp.c_fc.weight"
    expected = 0.49 * frozen[0][name] + 0.42 * dict(point.named_parameters())[name] + 0.09 * frozen[1][name]
    assert torch.allclose(weights[name], expected, atol=1e-6)
    weights[name].sum().backward()  # d/dθ_free of Σ θ(0.3) = the control point's coefficient 2t(1 - t)
    assert torch.allclose(dict(point.named_parameters())[name].grad, torch.full_like(expected, 0.42))
    draws = [point.draw()[1] for _ in range(3)]
    point.draws = 1  # as on resume after one micro-batch
    assert point.draw()[1] == draws[1]


def test_the_point_follows_the_modules_mode(runs):
    """Dropout acts in training and not in validation (the weightless architecture follows the mode)."""
    point, _ = _two_run_point(runs, "chain", dataclasses.replace(CONFIG, dropout=0.5))
    idx = torch.arange(CONFIG.block_size).view(1, -1) % CONFIG.vocab_size
    point.eval()
    assert torch.equal(point(idx)[0], point(idx)[0])
    point.train()
    point.draw = lambda: (point.paths()[0], 0.5)  # the same θ(t) twice: only dropout can differ
    assert not torch.equal(point(idx)[0], point(idx)[0])


def test_activation_checkpointing_recomputes_with_the_points_weights(runs):
    idx = torch.arange(CONFIG.block_size).view(1, -1) % CONFIG.vocab_size
    grads, calls = [], []
    for recompute in (False, True):
        point, _ = _two_run_point(runs, "chain")
        point.checkpoint_blocks = recompute
        block = point._architecture.net.transformer.h[0]
        block.forward = lambda x, run=block.forward, flag=recompute: (calls.append(flag), run(x))[1]
        point(idx, idx)[1].backward()
        grads.append({n: p.grad for n, p in point.named_parameters()})
    assert calls == [False, True, True]  # the block ran again in backward
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


def test_a_fitted_bend_lowers_the_barrier_of_the_straight_line(runs, tmp_path):
    root, found, data_dir = runs
    train(data_dir, tmp_path / "bend", nproc=1, launcher="python", **FIT,
          path_fit=json.dumps({"kind": "chain", "endpoints": [found["seed0"], found["seed1"]]}))
    meta = json.loads((tmp_path / "bend" / "final" / "modeconn_meta.json").read_text())
    assert meta["path_fit"]["kind"] == "chain"
    chain = {"name": "chain", "kind": "chain", "points": [found["seed0"], str(tmp_path / "bend" / "final"),
                                                         found["seed1"]]}
    barriers = _barriers(tmp_path / "probe", data_dir, runs={"a": found["seed0"], "b": found["seed1"]}, paths=[chain])
    print(f"loss barrier: straight {barriers['a--b']:.4f}, fitted chain {barriers['chain']:.4f}")
    assert barriers["a--b"] > 0.1 and barriers["chain"] < 0.5 * barriers["a--b"]


def test_a_star_centre_fitted_with_muon_on_two_ranks(runs, tmp_path):
    root, found, data_dir = runs
    anchors = [found[f"seed{i}"] for i in range(3)]
    train(data_dir, tmp_path / "star", nproc=2, **dict(FIT, **{"train.micro_batch": 8}), **{
        "optim.name": "muon", "optim.lr": 0.01, "deepspeed.zero_stage": 2,
        "path_fit": json.dumps({"kind": "star", "endpoints": anchors})})
    barriers = _barriers(tmp_path / "probe", data_dir, runs={f"s{i}": a for i, a in enumerate(anchors)},
                         stars=[{"name": "star", "centre": str(tmp_path / "star" / "final"), "anchors": anchors}])
    centre = [v for k, v in barriers.items() if k.startswith("star/")]
    lines = [v for k, v in barriers.items() if not k.startswith("star/")]
    print(f"loss barriers: centre to anchors {centre}, anchor to anchor {lines}")
    assert len(centre) == 3 and len(lines) == 3 and max(centre) < 0.5 * min(lines)


def _short_fit(runs, out, stage: int, nproc: int, **overrides):
    _, found, data_dir = runs
    train(data_dir, out, nproc=nproc, **dict(FIT, **{"train.steps": 6, "train.micro_batch": 4, "deepspeed.zero_stage": stage,
                                                  "optim.weight_decay": 0.1, "train.log_every": 1, **overrides}),
          path_fit=json.dumps({"kind": "chain", "endpoints": [found["seed0"], found["seed1"]]}))
    return out


def test_zero3_fits_what_zero0_fits_bit_for_bit(runs, tmp_path):
    """At ZeRO-3 the free point is gathered for the combination and for its gradient (fit.Zero3Point);
    without accumulation and clipping the stages sum alike, so the fits are bit-identical, with and
    without activation checkpointing."""
    z0, z3 = (_short_fit(runs, tmp_path / f"z{stage}", stage, nproc=2, **{"train.grad_clip": 0}) for stage in (0, 3))
    assert losses(z0) == losses(z3) and len(losses(z0)) == 6
    assert_same_weights(z0 / "final", z3 / "final")
    # Activation checkpointing recomputes each block in backward with the same θ(t).
    z3_recompute = _short_fit(runs, tmp_path / "z3-recompute", 3, nproc=2, **{"train.grad_clip": 0,
                                                                            "train.activation_checkpointing": "true"})
    assert_same_weights(z0 / "final", z3_recompute / "final")


def test_zero3_fit_with_muon_on_three_ranks(runs, tmp_path):
    """3 ranks cut the matrices at odd places; accumulation 2 and clipping on: ZeRO-3 equals ZeRO-2 to
    fp32 rounding (thresholds as in test_muon_distributed: AdamW amplifies rounding where gradients vanish)."""
    settings = {"optim.name": "muon", "optim.lr": 0.01, "train.grad_accum": 2, "train.grad_clip": 0.5}
    z2, z3 = (_short_fit(runs, tmp_path / f"z{stage}", stage, nproc=3, **settings) for stage in (2, 3))
    grad_norms = [r["grad_norm"] for r in metrics(z2)]
    assert max(grad_norms) > 0.5, "clipping never acted: the test would not check it"
    for step, loss in losses(z3).items():
        assert loss == pytest.approx(losses(z2)[step], rel=1e-6)
    a, b = weights(z2 / "final"), weights(z3 / "final")
    errors = {k: ((a[k] - b[k]).norm() / a[k].norm()).item() for k in a}
    matrices = [e for k, e in errors.items() if k.startswith("transformer.h.") and k.endswith("weight") and a[k].dim() == 2]
    assert len(matrices) == 8 and max(matrices) < 3e-5 and max(errors.values()) < 3e-4, errors


def test_a_stopped_fit_resumes_bit_exactly(runs, tmp_path):
    _, found, data_dir = runs
    fit = dict(FIT, **{"train.steps": 12, "train.micro_batch": 4, "deepspeed.zero_stage": 3, "checkpoint.every": 0,
                       "path_fit": json.dumps({"kind": "bezier", "endpoints": [found["seed0"], found["seed1"]],
                                               "t_range": [0.2, 0.8]})})
    train(data_dir, tmp_path / "straight", nproc=2, **fit)
    train(data_dir, tmp_path / "stopped", nproc=2, **fit, **{"train.stop_at_step": 5})
    resumed = train(data_dir, tmp_path / "stopped", nproc=2, **fit, resume="auto")
    assert "at step 5" in resumed.stdout
    assert_same_weights(tmp_path / "straight" / "final", tmp_path / "stopped" / "final")


def test_bad_fits_are_refused(runs, tmp_path):
    _, found, data_dir = runs
    one = train(data_dir, tmp_path / "one", nproc=1, launcher="python", check=False,
                path_fit=json.dumps({"kind": "star", "endpoints": [found["seed0"]]}))
    assert one.returncode == 2 and "a star needs 2 or more anchors, got 1" in one.stderr
