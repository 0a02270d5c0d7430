"""Official checkpoints -> pargen: read safely, configuration off the shapes, loaded strictly."""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch

from ..errors import PargenError

WRAPPERS = ("model", "module", "state_dict")  # where training scripts keep the weights inside a checkpoint


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names without the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes training wrappers add."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}


def read_state(src: str | os.PathLike | dict[str, Any], what: str = "state dict") -> dict[str, torch.Tensor]:
    """A plain {name: tensor} dict from a path (or a dict): `torch.load(weights_only=True)`, so no pickled code
    runs (argparse.Namespace, the `args` entry of LlamaGen's training checkpoints, is the one class allowed: it
    only holds values); the weights are unwrapped from a `model` / `module` / `state_dict` entry."""
    if isinstance(src, dict):
        sd = src
    else:
        if not os.path.exists(src):
            raise PargenError(f"no such file: {src}")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles that need code, truncated or foreign files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                first = "it is not a plain tensor file; pargen never unpickles code"
            raise PargenError(f"{src} is not a loadable {what}: {first[:200]}") from None
    if not isinstance(sd, dict):
        raise PargenError(f"{src} holds a {type(sd).__name__}, not a {what}")
    for key in WRAPPERS:
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise PargenError(f"{src}: entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor; not a {what}")
    return sd
