"""The theory testbed: properties that must hold (a network against itself has no barrier, a
convex model has none, a permuted copy of a ReLU net does; Muon's steps on the two-layer net are
torch.optim.Muon's), and a miniature of every experiment through the theory.py command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_png
from modeconn.errors import ConfigError
from modeconn.theory import landscape
from modeconn.theory.nets import Task, digits, init_state, make_net, teacher_student
from modeconn.theory.training import OptimSpec, lr_factor, train
from modeconn.verdicts import verdict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regression():
    return teacher_student(d=6, teacher_width=2, n_train=64, n_test=64, seed=3)


def test_a_network_against_itself_has_no_barrier(regression):
    net = make_net(regression, 16)
    state, _ = train(net, regression, init_state(net, 0), OptimSpec(lr=1e-2, steps=50), data_seed=0)
    curve = landscape.linear_barrier(net, regression, state, state)
    # (1 − t) θ + t θ is θ up to rounding
    assert abs(curve["loss_barrier"]) < 1e-6 and abs(curve["test_loss_barrier"]) < 1e-6
    assert max(curve["train_loss"]) - min(curve["train_loss"]) < 1e-6
    assert landscape.distance(state, state) == 0.0


def test_a_convex_model_has_no_barrier_and_a_permuted_relu_net_has_one():
    task = digits(n_train=400)
    linear = nn.Linear(64, 10)  # cross-entropy of a linear model is convex in its parameters
    init = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in linear.named_parameters()}
    a, _ = train(linear, task, init, OptimSpec(name="sgd", lr=0.5, steps=60, batch_size=32), data_seed=0)
    b, _ = train(linear, task, init_state(linear, 5), OptimSpec(name="adamw", lr=0.05, steps=60), data_seed=1)
    assert landscape.distance(a, b) > 1.0
    assert landscape.linear_barrier(linear, task, a, b)["loss_barrier"] <= 1e-6

    # The same function with its hidden units permuted: equal endpoints, a bump in between.
    net = make_net(task, 16)
    state, _ = train(net, task, init_state(net, 0), OptimSpec(lr=1e-2, steps=100, batch_size=32), data_seed=0)
    perm = torch.roll(torch.arange(16), 1)
    permuted = {"hidden.weight": state["hidden.weight"][perm], "hidden.bias": state["hidden.bias"][perm],
                "out.weight": state["out.weight"][:, perm], "out.bias": state["out.bias"]}
    curve = landscape.linear_barrier(net, task, state, permuted)
    assert abs(curve["train_loss"][0] - curve["train_loss"][-1]) < 1e-5
    assert curve["loss_barrier"] > 0.05


def test_muon_on_the_two_layer_net_equals_torch_muon_with_adamw(regression):
    """Ours (bf16 Newton–Schulz, the oracle's dtype) against torch.optim.Muon on the hidden weight
    and torch.optim.AdamW on the output layer and bias, 20 full-batch steps."""
    task = teacher_student(d=6, teacher_width=2, n_train=64, n_test=8, seed=3)
    net = make_net(task, 16, bias=True)
    init = init_state(net, 0)
    init["hidden.bias"] = torch.randn(16, generator=torch.Generator().manual_seed(9)) * 0.1
    spec = OptimSpec(name="muon", lr=0.02, aux_lr=3e-3, steps=20, decay="constant", weight_decay=0.1,
                     ns_dtype="bfloat16")
    ours, _ = train(net, task, init, spec, data_seed=0)

    ref = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    muon = torch.optim.Muon([ref["hidden.weight"]], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                            adjust_lr_fn="original")
    adamw = torch.optim.AdamW([ref["hidden.bias"], ref["out.weight"]], lr=3e-3, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0, fused=True)
    for _ in range(20):
        loss = task.loss(torch.func.functional_call(net, ref, (task.x_train,)), task.y_train)
        loss.backward()
        muon.step(), adamw.step(), muon.zero_grad(), adamw.zero_grad()
    for name, p in ref.items():
        assert torch.allclose(ours[name], p.detach(), rtol=0, atol=1e-6), name
    assert (ours["hidden.weight"] - init["hidden.weight"]).norm() > 0.1


def test_data_order_seed_is_separate_from_the_init_seed(regression):
    net = make_net(regression, 8)
    init = init_state(net, 0)
    spec = OptimSpec(lr=1e-2, steps=30, batch_size=16)
    a, _ = train(net, regression, init, spec, data_seed=1)
    again, _ = train(net, regression, init, spec, data_seed=1)
    other, _ = train(net, regression, init, spec, data_seed=2)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert landscape.distance(a, other) > 0
    full = OptimSpec(lr=1e-2, steps=30)  # full batch: the data order does not enter
    x, _ = train(net, regression, init, full, data_seed=1)
    y, _ = train(net, regression, init, full, data_seed=2)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(init["hidden.weight"], init_state(net, 0)["hidden.weight"])


def test_schedule_warms_up_then_decays_to_zero():
    spec = OptimSpec(steps=100, warmup=0.2)
    assert lr_factor(0, spec) == pytest.approx(1 / 20) and lr_factor(19, spec) == 1.0
    assert lr_factor(20, spec) == 1.0 and lr_factor(99, spec) < 0.01
    assert lr_factor(50, OptimSpec(steps=100, decay="constant")) == 1.0
    with pytest.raises(ConfigError, match="not one of"):
        OptimSpec(name="adam")


def test_fitted_star_centre_beats_the_anchors_mean(regression):
    net = make_net(regression, 4)
    anchors = [train(net, regression, init_state(net, s), OptimSpec(lr=1e-2, steps=200), data_seed=0)[0]
               for s in range(3)]
    mean = {k: torch.stack([a[k] for a in anchors]).mean(0) for k in anchors[0]}
    centre = landscape.fit_star_centre(net, regression, anchors, steps=200, lr=1e-2, batch_size=0, seed=0)

    def path_loss(c):  # what the fit minimises: the mean train loss over the star's paths
        return sum(sum(landscape.linear_barrier(net, regression, c, a)["train_loss"]) for a in anchors)

    assert path_loss(centre) < 0.8 * path_loss(mean)


def test_a_verdict_is_all_some_or_none_of_its_parts():
    assert verdict([True, True]) == "reproduced" and verdict([True, False]) == "partly"
    assert verdict([False, False]) == "not reproduced"


def test_theory_command_runs_a_miniature_of_every_experiment(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "theory.py", "--config", "configs/theory/mini.yaml", "--out_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    for name in ("width_sweep", "sgd_adam", "star", "spectra"):
        # the verdict is the one its parts give (each part a measured comparison, in results.json)
        parts = results[name]["verdict_parts"]
        assert len(parts) == 2 and results[name]["verdict"] == verdict(list(parts.values()))
        assert_png(out / f"{name}.png")
    report = (out / "report.md").read_text()
    assert report.count("| reproduced |") + report.count("| partly |") + report.count("| not reproduced |") == 4

    sweep = results["width_sweep"]
    assert set(sweep["barrier_mean"]["adamw-muon same init"]) == {"2", "64"}
    assert len(sweep["barrier_mean"]) == 12  # adamw, muon, lion: 3 x 2 same-optimizer + 3 x 2 cross pairs
    assert all(v >= 0 for pair in sweep["barrier_mean"].values() for v in pair.values())  # t = 0, 1 are sampled
    for k, r in results["star"]["by_k"].items():  # the triangle inequality
        assert all(ratio >= 1 - 1e-9 for ratio in r["two_piece_length_over_distance"])
        assert len(r["centre_to_anchor_barriers"]) == int(k)
    sp = results["spectra"]
    for seed, curve in enumerate(sp["stable_rank_along_path"]):  # ends of the path are the two solutions
        assert curve[0] == pytest.approx(sp["stable_rank"]["adamw"][seed])
        assert curve[-1] == pytest.approx(sp["stable_rank"]["muon"][seed])
        assert all(1 <= r <= 16 for r in curve)


def test_theory_command_refuses_a_bad_key(tmp_path):
    proc = subprocess.run([sys.executable, "theory.py", "--config", "configs/theory/mini.yaml",
                           "--star.kz=[3]", "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "star.kz" in proc.stderr and "valid keys" in proc.stderr
    assert not any(tmp_path.iterdir())
