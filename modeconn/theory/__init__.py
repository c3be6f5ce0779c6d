"""The theory testbed: small networks (two-layer ReLU teacher–student, a one-hidden-layer MLP on the
8×8 digits) trained in memory on a CPU, probed with the same path, barrier and spectra code as the
GPT-2 runs (`modeconn.paths`, `modeconn.barrier`, `modeconn.spectra`), to check the seed claims in
minutes. `theory.py` runs the experiments and writes `reports/theory/`."""
