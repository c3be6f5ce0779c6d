"""benchmarks/gpu_check.sh --cpu-smoke: the GPU validation script, run end to end on tiny on the CPU.
It checks that every section ran and wrote its figures (the JSON's keys), not the figures: those
are the GPU's, recorded in benchmarks/RESULTS.md when a GPU machine runs the script."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from train_runner import env


def test_gpu_check_cpu_smoke_writes_every_section(shakespeare, tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--cpu-smoke", f"--data={shakespeare}"],
                          cwd=ROOT, env=env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["smoke"] is True and result["errors"] == {}, result["errors"]
    assert {"environment", "micro_batch", "train", "ns_error", "probe", "resume", "finished"} <= set(result)
    runs = result["train"]
    for name in ("adamw_compile_off", "muon_bf16_standard", "muon_fp16_gram"):
        assert runs[name]["tokens_per_s"] > 0 and runs[name]["step_seconds"] > 0, name
    assert "skipped" in runs["adamw_compile_on"]  # compile is a GPU figure
    for name in ("muon_bf16_standard", "muon_fp16_gram"):  # against AdamW at the same settings
        assert runs[name]["overhead_over_adamw"] > -1
    ns = result["ns_error"]
    # tiny: 2 layers x (q, k, v, attention proj, fc, mlp proj); fp32 NS is the polynomial to rounding
    assert ns["matrices"] == 12 and ns["fp32_standard"]["max"] < 1e-4
    assert result["probe"]["points"] == 5 and result["probe"]["seconds_per_point"] > 0
    assert set(result["probe"]["spectra_seconds_per_checkpoint"]) == {
        "ours_float64_gram_cpu", "svdvals_float32_device", "svdvals_float64_device"}
    # fp32 on one process: a stopped and resumed run is the unbroken one, bit for bit
    assert result["resume"]["bit_identical"] is True and result["resume"]["max_abs_diff"] == 0.0
    assert (out / "gpu_check.log").is_file()
