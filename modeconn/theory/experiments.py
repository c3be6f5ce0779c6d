"""The four experiments of the theory testbed, each a function from its config to a JSON-able
result with a verdict on its seed claim (reproduced / partly / not reproduced) and the numbers
behind it. Thresholds are part of the configs, so a verdict says what it was judged against."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

from modeconn.errors import ConfigError
from modeconn.paths import WeightPath, t_grid
from modeconn.theory import landscape
from modeconn.theory.nets import digits, init_state, make_net, teacher_student
from modeconn.theory.training import OptimSpec, evaluate, train
from modeconn.verdicts import verdict

Progress = Callable[[str], None]


def _spec(**kw) -> Callable[[], OptimSpec]:
    return lambda: OptimSpec(**kw)


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else float("nan")


# ---- 1. width sweep -------------------------------------------------------------------------

@dataclass
class WidthSweepConfig:
    widths: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    seeds: int = 3
    d: int = 8
    teacher_width: int = 2
    n_train: int = 256
    n_test: int = 1024
    bias: bool = False
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon", "lion"])
    adamw: OptimSpec = field(default_factory=_spec(name="adamw", lr=3e-3, steps=2000, batch_size=32))
    muon: OptimSpec = field(default_factory=_spec(name="muon", lr=2e-2, aux_lr=3e-3, steps=2000, batch_size=32))
    lion: OptimSpec = field(default_factory=_spec(name="lion", lr=1e-3, steps=2000, batch_size=32))
    sgd: OptimSpec = field(default_factory=_spec(name="sgd", lr=0.05, momentum=0.9, steps=2000, batch_size=32))
    points: int = 11
    # A pair counts as connected when its train-loss barrier is below this share of the loss of
    # the zero function (½ mean y²), and a run as at zero loss below `zero_loss` of it.
    connected: float = 0.01
    zero_loss: float = 0.01

    def __post_init__(self):
        if not {"adamw", "muon"} <= set(self.optimizers) <= {"adamw", "muon", "lion", "sgd"}:
            raise ConfigError(f"width_sweep.optimizers must include adamw and muon (the claim's pair) and may add "
                              f"lion, sgd; got {self.optimizers}")


Run = tuple[str, int, int]  # (optimizer, init seed offset, data seed offset)


def sweep_pairs(optimizers: list[str]) -> dict[str, tuple[Run, Run]]:
    """Same optimizer: same init with another data order, and another init. Two optimizers: from
    one init with one data order, and from two inits."""
    pairs = {}
    for o in optimizers:
        pairs[f"{o}-{o} same init"] = ((o, 0, 0), (o, 0, 1))
        pairs[f"{o}-{o} different init"] = ((o, 0, 0), (o, 1, 0))
    for i, a in enumerate(optimizers):
        for b in optimizers[i + 1:]:
            pairs[f"{a}-{b} same init"] = ((a, 0, 0), (b, 0, 0))
            pairs[f"{a}-{b} different init"] = ((a, 0, 0), (b, 1, 0))
    return pairs


def width_sweep(cfg: WidthSweepConfig, progress: Progress = lambda _: None) -> dict:
    task = teacher_student(cfg.d, cfg.teacher_width, cfg.n_train, cfg.n_test)
    scale = 0.5 * task.y_train.square().mean().item()
    pairs = sweep_pairs(cfg.optimizers)
    runs_needed = sorted({r for pair in pairs.values() for r in pair})
    table: dict[str, dict[int, list[float]]] = {p: {w: [] for w in cfg.widths} for p in pairs}
    final_loss: dict[str, dict[int, list[float]]] = {o: {w: [] for w in cfg.widths} for o in cfg.optimizers}
    stable_rank = {o: {w: [] for w in cfg.widths} for o in cfg.optimizers}
    for width in cfg.widths:
        net = make_net(task, width, cfg.bias)
        for seed in range(cfg.seeds):
            states = {}
            for opt, init_offset, data_offset in runs_needed:
                spec = getattr(cfg, opt)
                init = init_state(net, 1000 * seed + init_offset)
                states[(opt, init_offset, data_offset)], loss = train(net, task, init, spec, 1000 * seed + data_offset + 500)
                if (init_offset, data_offset) == (0, 0):
                    final_loss[opt][width].append(loss / scale)
                    stable_rank[opt][width].append(landscape.stable_rank(states[(opt, 0, 0)]))
                progress(f"width {width} seed {seed} {opt}")
            for pair, (a, b) in pairs.items():
                curve = landscape.linear_barrier(net, task, states[a], states[b], cfg.points)
                table[pair][width].append(curve["loss_barrier"] / scale)

    mean = {p: {w: _mean(v) for w, v in by_width.items()} for p, by_width in table.items()}
    small, large = cfg.widths[: max(1, len(cfg.widths) // 4)], cfg.widths[-max(1, len(cfg.widths) // 4):]
    same_opt = [p for p in pairs if p.startswith(("adamw-adamw", "muon-muon"))]
    shrink = {p: {"small_widths": _mean([mean[p][w] for w in small]), "large_widths": _mean([mean[p][w] for w in large])}
              for p in same_opt}
    connects_at_large = all(s["large_widths"] < cfg.connected for s in shrink.values())
    w0 = cfg.widths[0]
    cross_small = mean["adamw-muon same init"][w0]
    same_small = max(mean["adamw-adamw same init"][w0], mean["muon-muon same init"][w0])
    at_zero = {o: _mean([float(x < cfg.zero_loss) for x in final_loss[o][w0]]) for o in ("adamw", "muon")}
    disconnected_small = cross_small > cfg.connected and cross_small > same_small and min(at_zero.values()) > 0
    result = {
        "task": task.name, "loss_scale": scale, "widths": cfg.widths, "seeds": cfg.seeds, "optimizers": cfg.optimizers,
        "thresholds": {"connected": cfg.connected, "zero_loss": cfg.zero_loss},
        "barrier_normalised": {p: {str(w): v for w, v in table[p].items()} for p in pairs},
        "barrier_mean": {p: {str(w): v for w, v in mean[p].items()} for p in pairs},
        "final_train_loss_normalised": {o: {str(w): v for w, v in by.items()} for o, by in final_loss.items()},
        "stable_rank": {o: {str(w): v for w, v in by.items()} for o, by in stable_rank.items()},
        "same_optimizer_small_vs_large": shrink,
        "smallest_width": {"width": w0, "adamw_muon_same_init": cross_small, "max_same_optimizer": same_small,
                           "share_of_runs_at_zero_loss": at_zero},
        "verdict": verdict([connects_at_large, disconnected_small]),
        "verdict_parts": {"same-optimizer pairs connected (barrier < connected) at the largest widths": connects_at_large,
                          "AdamW-Muon barrier at the smallest width above the threshold and above the "
                          "same-optimizer barriers, with runs at zero loss": disconnected_small},
    }
    return result


# ---- 2. SGD vs Adam on the digits MLP -------------------------------------------------------

@dataclass
class SgdAdamConfig:
    width: int = 64
    n_train: int = 1500
    seeds: int = 3
    sgd: OptimSpec = field(default_factory=_spec(name="sgd", lr=0.05, momentum=0.9, steps=1500, batch_size=32))
    adam: OptimSpec = field(default_factory=_spec(name="adamw", lr=3e-3, steps=1500, batch_size=32))
    warmup: float = 0.2
    points: int = 11


def sgd_vs_adam(cfg: SgdAdamConfig, progress: Progress = lambda _: None) -> dict:
    """Two runs spawned from one init with different data orders, per optimizer, with and
    without warm-up; barriers of train loss and of test error."""
    task = digits(cfg.n_train)
    net = make_net(task, cfg.width)
    settings = {}
    for label, base in (("sgd", cfg.sgd), ("adam", cfg.adam)):
        settings[label] = base
        settings[f"{label} + warm-up"] = dataclasses.replace(base, warmup=cfg.warmup)
    rows = {s: {"loss_barrier": [], "error_barrier": [], "test_error": []} for s in settings}
    for seed in range(cfg.seeds):
        init = init_state(net, seed)
        for label, spec in settings.items():
            a, _ = train(net, task, init, spec, 100 + 2 * seed)
            b, _ = train(net, task, init, spec, 101 + 2 * seed)
            curve = landscape.linear_barrier(net, task, a, b, cfg.points)
            rows[label]["loss_barrier"].append(curve["loss_barrier"])
            rows[label]["error_barrier"].append(curve["error_barrier"])
            rows[label]["test_error"].append(_mean([curve["test_error"][0], curve["test_error"][-1]]))
            progress(f"seed {seed} {label}")
    mean = {s: {k: _mean(v) for k, v in r.items()} for s, r in rows.items()}
    amplifies = mean["adam"]["loss_barrier"] > mean["sgd"]["loss_barrier"]
    warmup_helps = mean["adam + warm-up"]["loss_barrier"] < mean["adam"]["loss_barrier"]
    return {"task": task.name, "width": cfg.width, "runs": rows, "mean": mean,
            "verdict": verdict([amplifies, warmup_helps]),
            "verdict_parts": {"Adam's loss barrier above SGD's": amplifies,
                              "warm-up lowers Adam's loss barrier": warmup_helps}}


# ---- 3. star and two-piece paths ------------------------------------------------------------

@dataclass
class StarConfig:
    ks: list[int] = field(default_factory=lambda: [3, 4, 5])
    width: int = 32
    n_train: int = 1500
    anchor: OptimSpec = field(default_factory=_spec(name="adamw", lr=3e-3, steps=1500, batch_size=32))
    centre_steps: int = 1500
    centre_lr: float = 1e-3
    centre_batch_size: int = 64
    points: int = 11
    length_tolerance: float = 0.1  # "nearly equal": two-piece length within 10% of the distance


def star_paths(cfg: StarConfig, progress: Progress = lambda _: None) -> dict:
    """k AdamW solutions from different inits; a fitted centre; barriers centre–anchor vs
    anchor–anchor; the two-piece path a -> centre -> b against the distance |a − b|."""
    task = digits(cfg.n_train)
    net = make_net(task, cfg.width)
    anchors = []
    for i in range(max(cfg.ks)):
        anchors.append(train(net, task, init_state(net, 200 + i), cfg.anchor, 300 + i)[0])
        progress(f"anchor {i}")
    anchor_pairs = {(i, j): landscape.linear_barrier(net, task, anchors[i], anchors[j], cfg.points)["loss_barrier"]
                    for i in range(len(anchors)) for j in range(i + 1, len(anchors))}
    out = {}
    for k in cfg.ks:
        centre = landscape.fit_star_centre(net, task, anchors[:k], cfg.centre_steps, cfg.centre_lr,
                                           cfg.centre_batch_size, seed=k)
        to_centre = [landscape.linear_barrier(net, task, centre, a, cfg.points)["loss_barrier"] for a in anchors[:k]]
        between = [b for (i, j), b in anchor_pairs.items() if j < k]
        ratios = [(landscape.distance(anchors[i], centre) + landscape.distance(centre, anchors[j]))
                  / landscape.distance(anchors[i], anchors[j]) for i in range(k) for j in range(i + 1, k)]
        # The linear barrier does not depend on the direction of travel: a -> centre is centre -> a.
        two_piece = [max(to_centre[i], to_centre[j]) for i in range(k) for j in range(i + 1, k)]
        out[str(k)] = {"centre_to_anchor_barriers": to_centre, "anchor_to_anchor_barriers": between,
                       "two_piece_barriers": two_piece, "two_piece_length_over_distance": ratios,
                       "centre_train_loss": evaluate(net, task, centre)["train_loss"]}
        progress(f"centre k={k}")
    lower = all(_mean(r["centre_to_anchor_barriers"]) < _mean(r["anchor_to_anchor_barriers"]) for r in out.values())
    equal_length = all(max(r["two_piece_length_over_distance"]) <= 1 + cfg.length_tolerance for r in out.values())
    return {"task": task.name, "width": cfg.width, "by_k": out,
            "verdict": verdict([lower, equal_length]),
            "verdict_parts": {"centre-to-anchor barriers below anchor-to-anchor barriers (mean, every k)": lower,
                              f"two-piece length within {cfg.length_tolerance:.0%} of the distance (every pair)":
                                  equal_length}}


# ---- 4. spectra -----------------------------------------------------------------------------

@dataclass
class SpectraConfig:
    width: int = 128
    n_train: int = 1500
    seeds: int = 3
    adamw: OptimSpec = field(default_factory=_spec(name="adamw", lr=3e-3, steps=1500, batch_size=32))
    muon: OptimSpec = field(default_factory=_spec(name="muon", lr=2e-2, aux_lr=3e-3, steps=1500, batch_size=32))
    points: int = 11


def spectra(cfg: SpectraConfig, sweep: Optional[dict] = None, progress: Progress = lambda _: None) -> dict:
    """Stable rank of the hidden weight of AdamW vs Muon solutions from the same init on the
    digits MLP, and along the AdamW -> Muon path; with the width sweep's numbers when given."""
    task = digits(cfg.n_train)
    net = make_net(task, cfg.width)
    ts = t_grid(1 / (cfg.points - 1))
    ranks = {"adamw": [], "muon": []}
    along = []
    for seed in range(cfg.seeds):
        init = init_state(net, 400 + seed)
        a, _ = train(net, task, init, cfg.adamw, 500 + seed)
        m, _ = train(net, task, init, cfg.muon, 500 + seed)
        ranks["adamw"].append(landscape.stable_rank(a))
        ranks["muon"].append(landscape.stable_rank(m))
        path = WeightPath("linear", ("adamw", "muon"))
        along.append([landscape.stable_rank(landscape.combine([a, m], path.coefficients(t))) for t in ts])
        progress(f"seed {seed}")
    higher = all(r_m > r_a for r_a, r_m in zip(ranks["adamw"], ranks["muon"]))
    monotone = all(all(y >= x - 1e-6 for x, y in zip(curve, curve[1:])) for curve in along)
    result = {"task": task.name, "width": cfg.width, "stable_rank": ranks, "t": ts, "stable_rank_along_path": along,
              "verdict": verdict([higher, monotone]),
              "verdict_parts": {"Muon's stable rank above AdamW's (every seed)": higher,
                                "stable rank rises monotonically from AdamW to Muon (every seed)": monotone}}
    if sweep is not None:
        result["width_sweep_stable_rank"] = sweep["stable_rank"]
    return result


@dataclass
class TheoryConfig:
    out_dir: str = "reports/theory"
    width_sweep: WidthSweepConfig = field(default_factory=WidthSweepConfig)
    sgd_adam: SgdAdamConfig = field(default_factory=SgdAdamConfig)
    star: StarConfig = field(default_factory=StarConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)

