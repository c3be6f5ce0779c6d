"""Run the entry-point scripts (train.py, probe.py, ...) as a user does, many times and fast.

A server process imports the libraries once; for each command it forks a child that runs the
script as `__main__` with the given arguments, environment and working directory, stdout and
stderr going to files. The child's exit status is the script's: an uncaught exception prints its
traceback and exits 1, as the interpreter does. A fork costs a fraction of a second where a new
interpreter costs seconds of imports, so a battery of bad inputs stays cheap.

    with EntryPoints() as entry:
        result = entry.run("train.py", "--config", "x.yaml")   # .rc, .stdout, .stderr
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("modeconn.train", "modeconn.probe", "modeconn.align", "modeconn.evaluate", "modeconn.data.prepare",
           "modeconn.experiment", "transformers")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


def _child(request: dict) -> None:
    import runpy
    import traceback

    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [request["script"], *request["argv"]]
    try:
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: B036 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    protocol = os.fdopen(os.dup(1), "w")  # answers go here; what the libraries print goes to stderr
    os.dup2(2, 1)
    for module in PRELOAD:
        __import__(module)
    print(json.dumps({"ready": True}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            protocol.close()
            _child(request)
        deadline = time.time() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = "timeout"
                break
            time.sleep(0.01)
        print(json.dumps({"rc": rc}), file=protocol, flush=True)


class EntryPoints:
    def __init__(self, env: dict | None = None):
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.dir = Path(tempfile.mkdtemp(prefix="entry-points-"))
        self.count = 0

    def __enter__(self) -> "EntryPoints":
        self.server = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=self.env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert json.loads(self.server.stdout.readline()) == {"ready": True}
        return self

    def run(self, script: str, *argv: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 180) -> Result:
        self.count += 1
        out, err = self.dir / f"{self.count}.out", self.dir / f"{self.count}.err"
        request = {"script": script, "argv": [str(a) for a in argv], "cwd": str(cwd),
                   "env": {k: str(v) for k, v in (env or {}).items()}, "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        rc = json.loads(self.server.stdout.readline())["rc"]
        assert rc != "timeout", f"{script} {' '.join(map(str, argv))} ran past {timeout} s"
        return Result(rc, out.read_text(), err.read_text())

    def __exit__(self, *_) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    serve()
