import socket
import subprocess
from pathlib import Path

import pytest
import torch

ORACLES = Path(__file__).resolve().parents[2] / "shared" / "oracles"


def oracle(name: str):
    """Load an oracle file from ../shared/oracles, or skip with the reason."""
    path = ORACLES / name
    if not path.exists():
        pytest.skip(f"reference outputs {path} are absent (they live in ../shared/oracles beside the repo)")
    return torch.load(path, weights_only=True)


def free_port() -> int:
    """A free local TCP port for a torchrun rendezvous (a fixed one may still be held by an earlier run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOO_TEARDOWN = "terminate called without an active exception"


def run_torchrun(cmd: list[str], before_retry=None, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run` of a torchrun command (output captured as text), run once more (after `before_retry()`,
    which clears what the first run wrote) when a process aborted in gloo's teardown: a rare race in torch's gloo
    backend (once in about 30 runs here) where a process is killed by std::terminate after its work and
    `destroy_process_group` are done. Any other failure, or this one twice, stands."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0 and GLOO_TEARDOWN in r.stderr:
        if before_retry is not None:
            before_retry()
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return r


@pytest.fixture(autouse=True)
def _user_dir(tmp_path_factory, monkeypatch):
    """Calibration records of bundled checkpoints go to the user directory: a fresh one per test, never ~."""
    monkeypatch.setenv("PARGEN_HOME", str(tmp_path_factory.mktemp("pargen-home")))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
