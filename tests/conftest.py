import socket
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


@pytest.fixture(autouse=True)
def _user_dir(tmp_path_factory, monkeypatch):
    """Calibration records of bundled checkpoints go to the user directory: a fresh one per test, never ~."""
    monkeypatch.setenv("PARGEN_HOME", str(tmp_path_factory.mktemp("pargen-home")))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
