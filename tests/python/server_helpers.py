"""What the tests that start the real binaries share: their paths, the skip-or-fail rule for what is missing,
tools/soak.py as a module, and the real dysco-server as a subprocess on loopback (any transport).

Readiness is read from the server's own log line (`event=ready`), so it works for TLS and token-protected
servers alike; stop() drains it with SIGTERM and returns its exit code.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_BIN = Path(os.environ.get("DYSCO_SERVER_BIN", REPO / "build" / "bin" / "dysco-server"))
CLIENT_BIN = Path(os.environ.get("DYSCO_CLIENT_BIN", REPO / "build" / "bin" / "dysco-client"))
MODEL_DIR = Path(os.environ.get("DYSCO_MODEL_DIR", REPO / "models" / "smollm2-135m-instruct"))


def missing(what):
    """Skips, or fails when CI is set (a missing build or model there is a defect, not a skip)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (CI is set, so this is a failure, not a skip)")
    pytest.skip(f"{what} is missing")


def need(*paths):
    """missing() for the first of these files that does not exist."""
    for path in paths:
        if not path.exists():
            missing(str(path))


def load_soak():
    """tools/soak.py as a module (its ServerProcess, scrape and series helpers)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("dysco_soak", REPO / "tools" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, work, name, extra):
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = work / f"{name}.log"
        self.target = f"127.0.0.1:{self.port}"
        args = [str(SERVER_BIN), "--model", str(MODEL_DIR), "--host", "127.0.0.1", "--port", str(self.port),
                "--metrics-port", str(self.metrics_port), "--kv-pages", "64", "--max-batch", "2",
                "--threads", "1", *map(str, extra)]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s=180):
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"dysco-server exited {self.process.returncode}:\n{self.log()[-3000:]}")
            if "event=ready" in self.log():
                return
            time.sleep(0.2)
        raise RuntimeError(f"dysco-server not ready after {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


