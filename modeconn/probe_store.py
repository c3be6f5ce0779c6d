"""A probe batch's results on disk: every file name (`ProbeFiles`), the rows of results.jsonl
(read, resumed, appended), the settings a resumed batch must share, and the saved singular values.

Rank 0 writes; every rank may read. Nothing here measures or plans.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeconn import config as config_lib
from modeconn.atomic import atomic_write_text, temporary_path
from modeconn.errors import ModeconnError
from modeconn.paths import path_slug

# A resumed batch must have been run with the same settings of these config sections.
SHARED_SETTINGS = ("data", "spectra", "align")


class ProbeFiles:
    """Every file and directory name of a probe batch, made here."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.results = self.out / "results.jsonl"
        self.config = self.out / "probe_config.yaml"
        self.summary = self.out / "summary.csv"
        self.groups = self.out / "groups.csv"
        self.spectra_distances = self.out / "spectra_distances.csv"
        self.plots = self.out / "plots"

    def spectra(self, path_name: str, t: float) -> Path:
        """The singular values of every matrix at t on a path."""
        return self.out / "spectra" / path_slug(path_name) / f"t_{t:.4f}.safetensors"

    def point(self, path_name: str, t: float) -> Path:
        """θ(t) of a path, written as a checkpoint (`save_points`)."""
        return self.out / "points" / path_slug(path_name) / f"t_{t:.4f}"

    def aligned_pair(self, a: str, b: str) -> tuple[Path, Path]:
        """Where the pair (a, b) of `runs` is kept aligned: A in canonical form (with align.residual),
        B aligned to A."""
        folder = self.out / "aligned" / f"{a}--{b}"
        return folder / a, folder / b


def read_rows(results: Path) -> list[dict]:
    """The complete rows of a results.jsonl (a line cut short by a kill is dropped)."""
    rows = []
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "path" in row and ("t" in row or "alpha" in row):
                rows.append(row)
    return rows


class ResultsStore:
    def __init__(self, files: ProbeFiles):
        self.files = files

    def rows(self) -> list[dict]:
        return read_rows(self.files.results)

    def resume(self) -> list[dict]:
        """The rows already written, with the file rewritten to them (rank 0): a cut-off line goes."""
        rows = self.rows()
        atomic_write_text(self.files.results, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def append(self, new: list[dict]) -> None:
        with open(self.files.results, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())

    def check_settings(self, cfg) -> None:
        """A batch resumed with other data, spectra or alignment settings would mix incomparable
        rows: refused, naming the saved file (every rank checks, so all of them stop)."""
        path, current = self.files.config, config_lib.to_dict(cfg)
        if not path.is_file():
            return
        import yaml

        try:
            saved = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ModeconnError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); it records this batch's "
                                f"settings: restore it, or use another out_dir") from None
        if not isinstance(saved, dict):
            raise ModeconnError(f"{path}: not a probe config; restore it, or use another out_dir")
        for key in SHARED_SETTINGS:
            if saved.get(key) != current.get(key) and (key != "align" or saved.get(key) is not None):
                raise ModeconnError(f"{path}: this batch was run with other {key} settings ({saved.get(key)}); "
                                    f"use another out_dir to probe with {current.get(key)}")

    def save_settings(self, cfg) -> None:
        self.files.out.mkdir(parents=True, exist_ok=True)
        config_lib.save(cfg, self.files.config)

    def publish_spectra(self, spectra: dict[str, torch.Tensor], at: list[tuple[str, float]]) -> None:
        """One point's singular values, as spectra/<path>/t_<t>.safetensors of every (path, t) it is:
        written once, then hard-linked (copied where the filesystem has no links); each file appears
        whole or not at all."""
        tensors = {k: v.contiguous() for k, v in spectra.items()}
        first = None
        for target in (self.files.spectra(name, t) for name, t in at):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(target)
            if first is None:
                save_file(tensors, str(tmp))
            else:
                try:
                    os.link(first, tmp)
                except OSError:
                    shutil.copyfile(first, tmp)
            os.replace(tmp, target)
            first = first or target
