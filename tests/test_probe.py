"""probe.py end to end on small random checkpoints: sharded over ranks (by points or by batches)
it writes the 1-rank rows; a batch cut off mid-way resumes without duplicates or losses; planes,
saved path points and wandb; bad input fails before evaluating."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_png, write_token_dir
from modeconn.hf import load_hf, save_hf
from modeconn.model import GPT, ModelConfig
from train_runner import command, env

VOCAB = 211


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    gen = np.random.default_rng(0)
    data = write_token_dir(root / "data", {"train": [gen.integers(0, VOCAB, 4000).astype(np.uint16)],
                                           "val": [gen.integers(0, VOCAB, 2000).astype(np.uint16)]})
    cfg = ModelConfig.from_preset("tiny", n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB, block_size=32)
    runs = {}
    for seed in range(3):
        torch.manual_seed(seed)
        save_hf(GPT(cfg), cfg, root / f"run{seed}")
        runs[f"r{seed}"] = str(root / f"run{seed}")
    return root, data, runs


def probe(out, data, runs, nproc=1, check=True, **overrides):
    args = {"runs": json.dumps(runs), "data.dir": data, "data.val_windows": 12, "data.eval_batch_size": 4,
            "t_values": "[0.0, 0.25, 0.5, 0.75, 1.0]", "out_dir": out, "plots": "false"}
    args.update(overrides)
    cmd = command(nproc, "python" if nproc == 1 else "torchrun", "probe.py") + [f"--{k}={v}" for k, v in args.items()]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"probe.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def rows(out):
    result = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in result:
        r.pop("seconds")
    return sorted(result, key=lambda r: (r["path"], r.get("t", -1), r.get("alpha", -1), r.get("beta", -1)))


@pytest.fixture(scope="module")
def one_rank(setup):
    root, data, runs = setup
    probe(root / "one", data, runs, plots="true")
    return rows(root / "one")


def test_two_ranks_write_the_one_rank_rows_and_a_summary(setup, one_rank):
    root, data, runs = setup
    two = probe(root / "two", data, runs, nproc=2)  # auto: 7 rounds of 2 points, the last point shared
    one = one_rank
    assert len(one) == 3 * 5 and one == rows(root / "two")  # row for row, spectra summaries included
    assert "(shard: auto)" in two.stdout
    assert {r["path"] for r in one} == {"r0--r1", "r0--r2", "r1--r2"}
    assert one[0]["spectra"]["h.0.q"]["stable_rank"] > 1
    summary = (root / "one" / "summary.csv").read_text().splitlines()
    assert len(summary) == 4 and "loss_barrier" in summary[0] and "path_length" in summary[0]
    assert_png(root / "one" / "plots" / "barriers.png")
    assert (root / "one" / "spectra" / "r0--r1" / "t_0.5000.safetensors").is_file()


def test_three_ranks_sharing_every_point_write_the_one_rank_rows(setup, one_rank):
    """shard=batches: 3 validation batches and 12 matrices per point, a third each; bitwise the same rows."""
    root, data, runs = setup
    probe(root / "three", data, runs, nproc=3, shard="batches")
    assert rows(root / "three") == one_rank
    for t in ("0.0000", "0.5000"):
        mine, reference = (load_file(str(d / "spectra" / "r0--r2" / f"t_{t}.safetensors")) for d in
                           (root / "three", root / "one"))
        assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)


def test_planes_saved_points_and_wandb(setup, one_rank, tmp_path):
    root, data, runs = setup
    out = tmp_path / "plane"
    plane = {"name": "r0-r1-r2", "points": [runs["r0"], runs["r1"], runs["r2"]], "range": [0.0, 1.0], "resolution": 5}
    probe(out, data, {"r0": runs["r0"], "r1": runs["r1"]}, plots="true", planes=json.dumps([plane]),
          save_points="[0.5]", **{"wandb.mode": "offline", "spectra.enabled": "false"})
    got = rows(out)
    on_plane = [r for r in got if r["path"] == "r0-r1-r2"]
    assert len(on_plane) == 25 and {r["alpha"] for r in on_plane} == {0.0, 0.25, 0.5, 0.75, 1.0}
    # β = 0 is the line r0 -> r1: the same coefficients (C's is 0), so the same values bit for bit
    line = {r["t"]: r for r in one_rank if r["path"] == "r0--r1"}
    for r in (r for r in on_plane if r["beta"] == 0.0):
        assert (r["loss"], r["token_error"]) == (line[r["alpha"]]["loss"], line[r["alpha"]]["token_error"])
    corner_c = next(r for r in on_plane if (r["alpha"], r["beta"]) == (0.0, 1.0))
    assert corner_c["loss"] == next(r["loss"] for r in one_rank if r["path"] == "r0--r2" and r["t"] == 1.0)
    assert_png(out / "plots" / "plane_r0-r1-r2.png")

    # the saved midpoint is an ordinary checkpoint: the in-memory formula, exactly; probing it gives the t=0.5 row
    point = out / "points" / "r0--r1" / "t_0.5000"
    _, saved = load_hf(point)
    (_, a), (_, b) = load_hf(runs["r0"]), load_hf(runs["r1"])
    assert all(torch.equal(saved[k], 0.5 * a[k] + 0.5 * b[k]) for k in saved)
    meta = json.loads((point / "modeconn_meta.json").read_text())
    assert meta["t"] == 0.5 and meta["coefficients"] == [[0, 0.5], [1, 0.5]]
    probe(tmp_path / "mid", data, {"mid": str(point), "r1": runs["r1"]}, t_values="[0.0, 1.0]",
                  **{"spectra.enabled": "false"})
    assert rows(tmp_path / "mid")[0]["loss"] == line[0.5]["loss"]

    run_id = (out / "wandb_run_id").read_text()
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(run_dir.glob("files/media/table/summary_*.table.json"))


def test_a_cut_off_batch_resumes_without_duplicates(setup):
    root, data, runs = setup
    out = root / "cut"
    probe(out, data, runs)
    complete = rows(out)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:40])  # killed mid-write
    again = probe(out, data, runs)
    assert "6 points done before, 9 to go" in again.stdout
    assert rows(out) == complete


def test_bad_input_fails_before_evaluation(setup, tmp_path):
    root, data, runs = setup
    cfg = ModelConfig.from_preset("tiny", n_layer=3, n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB, block_size=32)
    save_hf(GPT(cfg), cfg, tmp_path / "deeper")
    proc = probe(tmp_path / "out", data, dict(runs, deep=str(tmp_path / "deeper")), check=False)
    assert proc.returncode == 2 and "are different models (n_layer: 2 vs 3)" in proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()

    probe(tmp_path / "ok", data, {"a": runs["r0"], "b": runs["r1"]})
    proc = probe(tmp_path / "ok", data, {"a": runs["r0"], "b": runs["r1"]}, check=False, **{"data.val_windows": 8})
    assert proc.returncode == 2 and "was run with other data settings" in proc.stderr


def four_runs(root):
    """Four checkpoints in two groups by the optimizer their metadata records (2 x adamw, 2 x muon)."""
    cfg = ModelConfig.from_preset("tiny", n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB, block_size=32)
    runs = {}
    for seed, optimizer in enumerate(("adamw", "muon", "adamw", "muon")):
        torch.manual_seed(10 + seed)
        save_hf(GPT(cfg), cfg, root / f"{optimizer}{seed}", metadata={"optimizer": optimizer})
        runs[f"{optimizer}{seed}"] = str(root / f"{optimizer}{seed}")
    return runs


def test_pairing_rules_on_four_runs_in_two_groups(tmp_path):
    from modeconn.probe import ProbeConfig
    from modeconn.probe_store import ProbeFiles
    from modeconn.probe_plan import build_plan

    runs = four_runs(tmp_path)
    ts = [0.0, 1.0]

    def pairs(**cfg):
        plan = build_plan(ProbeConfig(runs=runs, **cfg), ts, ProbeFiles(tmp_path / "out").aligned_pair)
        return {(p.name, p.group) for p in plan.paths}

    assert len(pairs()) == 6
    assert pairs(pairs="within") == {("adamw0--adamw2", "adamw--adamw"), ("muon1--muon3", "muon--muon")}
    assert pairs(pairs="across") == {("adamw0--muon1", "adamw--muon"), ("adamw0--muon3", "adamw--muon"),
                                     ("muon1--adamw2", "adamw--muon"), ("adamw2--muon3", "adamw--muon")}
    # groups given as labels instead: seeds 0, 1 against 2, 3
    labels = {"adamw0": "early", "muon1": "early", "adamw2": "late", "muon3": "late"}
    assert {name for name, _ in pairs(pairs="within", groups=labels)} == {"adamw0--muon1", "adamw2--muon3"}
    with pytest.raises(Exception, match="missing muon3"):
        pairs(groups={k: v for k, v in labels.items() if k != "muon3"})


def test_each_checkpoint_is_evaluated_once_and_its_rows_are_the_per_path_ones(setup, tmp_path):
    """All 6 pairs of 4 runs at 5 t: 30 points from 4 checkpoint evaluations and 18 interior
    ones. Every row at a checkpoint is that checkpoint's own, bitwise; and it equals what the
    per-path form (1·θA + 0·θB, as each path computed its endpoints before) gives."""
    from modeconn.config import DataConfig
    from modeconn.distributed import World
    from modeconn.probe import ProbeConfig, Prober
    from modeconn.probe_plan import Measurement

    root, data, _ = setup
    runs = four_runs(tmp_path)
    cfg = ProbeConfig(runs=runs, t_values=[0.0, 0.25, 0.5, 0.75, 1.0], plots=False, out_dir=str(tmp_path / "out"),
                      data=DataConfig(dir=str(data), val_windows=12, eval_batch_size=4))
    prober = Prober(cfg, World(0, 1, 0, torch.device("cpu")))
    result = prober.run()
    assert result["evaluations"] == 4 + 6 * 3
    got = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(got) == 30
    at_checkpoint = {}
    for row in got:
        if row["t"] in (0.0, 1.0):
            assert row["checkpoint"] == row["points"][0 if row["t"] == 0.0 else 1]
            values = (row["loss"], row["token_error"], row["spectra"])
            assert at_checkpoint.setdefault(row["checkpoint"], values) == values  # bitwise (floats via JSON)
        else:
            assert "checkpoint" not in row
    assert len(at_checkpoint) == 4
    files = {p.read_bytes() for p in (tmp_path / "out" / "spectra").glob("*/t_0.0000.safetensors")}
    assert len(files) == 3  # the first run of each pair's runs: adamw0, muon1, adamw2 start paths
    # the per-path form, 1·A + 0·B, measured as every path measured its endpoints before
    a, b = runs["adamw0"], runs["muon1"]
    per_path = Measurement(("point", "adamw0--muon1", 0.0), (a, b), ((0, 1.0), (1, 0.0)), True)
    item = next(i for i in prober.plan.items if i.key == ("adamw0--muon1", 0.0))
    (row,), _ = prober.evaluator.assemble(per_path, [item], [prober.evaluator.measure(per_path)])
    assert (row["loss"], row["token_error"], row["spectra"]) == at_checkpoint[a]
    # a rerun finds everything done and evaluates nothing
    assert Prober(cfg, World(0, 1, 0, torch.device("cpu"))).run()["evaluations"] == 0


def test_group_statistics_from_the_summary(setup, one_rank):
    """groups.csv holds n, mean, std, min and max of the summary's per-path values, per group."""
    import csv
    import statistics

    root, _, _ = setup
    summary = list(csv.DictReader(open(root / "one" / "summary.csv")))
    groups = {(r["group"], r["quantity"]): r for r in csv.DictReader(open(root / "one" / "groups.csv"))}
    (group,) = {r["group"] for r in summary}  # no metadata: every run's group is "unknown"
    assert group == "unknown--unknown"
    for quantity in ("loss_barrier", "token_error_barrier_vs_mean", "endpoint_distance", "path_length"):
        values = [float(r[quantity]) for r in summary]
        stat = groups[(group, quantity)]
        assert int(stat["n"]) == 3
        assert float(stat["mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert float(stat["std"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert (float(stat["min"]), float(stat["max"])) == (min(values), max(values))
    assert_png(root / "one" / "plots" / "groups.png")


def test_distances_are_the_weights_own(setup, one_rank):
    """The endpoint distance is ‖θB − θA‖ over every tensor (computed here from the files, float64);
    a straight path's length is that distance (its ten steps of 0.1, 0.15, ... summed)."""
    import csv

    root, _, runs = setup
    summary = {r["path"]: r for r in csv.DictReader(open(root / "one" / "summary.csv"))}
    a, b = (load_file(str(Path(runs[k]) / "model.safetensors")) for k in ("r0", "r1"))
    expected = sum((b[k].double() - a[k].double()).square().sum().item() for k in a) ** 0.5
    assert float(summary["r0--r1"]["endpoint_distance"]) == pytest.approx(expected, rel=1e-6)
    assert float(summary["r0--r1"]["path_length"]) == pytest.approx(expected, rel=1e-6)


def test_a_path_row_is_what_hugging_face_computes_on_the_interpolated_weights(setup, one_rank):
    """An oracle of nobody here: GPT2LMHeadModel on (1 - t) θA + t θB, read from the files, on the
    probe's validation windows, gives the row's loss and token error."""
    from transformers import GPT2LMHeadModel

    from modeconn.data.loader import TokenWindows, ValidationSet

    root, data, runs = setup
    t = 0.25
    row = next(r for r in one_rank if r["path"] == "r0--r1" and r.get("t") == t)
    a, b = (load_file(str(Path(runs[k]) / "model.safetensors")) for k in ("r0", "r1"))
    model = GPT2LMHeadModel.from_pretrained(runs["r0"]).eval()
    missing, unexpected = model.load_state_dict({k: (1 - t) * a[k] + t * b[k] for k in a}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    windows = ValidationSet(TokenWindows(Path(data), "val", model.config.n_positions), 12)
    losses, errors, tokens = 0.0, 0, 0
    with torch.no_grad():
        for x, y in windows.batches(4):
            logits = model(x).logits.double()
            losses += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            errors += (logits.argmax(-1) != y).sum().item()
            tokens += y.numel()
    assert row["loss"] == pytest.approx(losses / tokens, rel=1e-6)  # neighbouring t differ by 3e-5 and more
    assert abs(row["token_error"] - errors / tokens) <= 1 / tokens  # at most one near-tie resolved otherwise
