"""The bounded soak test in its CI form: tools/soak.py --ci (`make soak` runs the full one).

About 60 s of mixed load against the real build/bin/dysco-server (plain and DySCO streams, client cancels,
short deadlines, malformed and unparseable requests, slow and vanishing readers, a burst past the queue, a
prompt at the context limit), then the checks of tools/soak.py: every dysco_requests_total and
dysco_requests_refused_total counter equal to what the client saw, the gauges back to 0, RSS growth within
its bound, health SERVING, exit 0 on SIGTERM. About 90 s in all; killed (with its server) after 175 s.

Skipped when the binaries or the model package are missing, unless the CI environment variable is set (then
it fails). DYSCO_SERVER_BIN / DYSCO_CLIENT_BIN / DYSCO_MODEL_DIR override the default paths.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc")

REPO = Path(__file__).resolve().parents[2]
SERVER_BIN = Path(os.environ.get("DYSCO_SERVER_BIN", REPO / "build" / "bin" / "dysco-server"))
CLIENT_BIN = Path(os.environ.get("DYSCO_CLIENT_BIN", REPO / "build" / "bin" / "dysco-client"))
MODEL_DIR = Path(os.environ.get("DYSCO_MODEL_DIR", REPO / "models" / "smollm2-135m-instruct"))
LIMIT_S = 175


def _missing(what):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (CI is set, so this is a failure, not a skip)")
    pytest.skip(f"{what} is missing")


def test_soak_short_form():
    for path in (SERVER_BIN, CLIENT_BIN):
        if not path.is_file():
            _missing(str(path))
    if not (MODEL_DIR / "model.pt").is_file():
        _missing(f"model package {MODEL_DIR} (run `make model`)")
    start = time.monotonic()
    # Its own session: on a timeout the whole group (the soak, its server, its clients) is killed.
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "soak.py"), "--ci", "--server-bin", str(SERVER_BIN),
                                "--client-bin", str(CLIENT_BIN), "--model", str(MODEL_DIR)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"the soak ran past {LIMIT_S} s:\n{out[-6000:]}")
    print(out)
    print(f"soak --ci took {time.monotonic() - start:.0f} s")
    assert process.returncode == 0, out[-8000:]
    assert "RESULT: PASS" in out
