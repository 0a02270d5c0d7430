"""Checkpoints: `NAME.safetensors` (weights) + `NAME.json` (family, config, provenance), written atomically.

Training state for exact resume (optimizer, EMA, step, RNG) goes to `NAME.state.pt`, read back with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import registry
from .config import from_dict, to_dict
from .errors import PargenError


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


FILES = (".safetensors", ".json", ".state.pt")  # a checkpoint's weights, description and training state


def clean_stale_tmp(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed `atomic_write` of this checkpoint left behind; returns what was removed."""
    s = stem(path)
    if not s.parent.is_dir():
        return []
    gone = []
    for suffix in FILES:
        for tmp in s.parent.glob(f".{s.name}{suffix}.*.tmp"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def exists(path: str | os.PathLike) -> bool:
    """Whether a checkpoint (weights, description or training state) is already at this path."""
    s = stem(path)
    return any(s.with_name(s.name + x).exists() for x in FILES)


def stem(path: str | os.PathLike) -> Path:
    """`runs/x`, `runs/x.json` and `runs/x.safetensors` all name the checkpoint `runs/x`."""
    p = Path(path)
    for suffix in FILES:
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def save(path: str | os.PathLike, model: torch.nn.Module, extra: dict[str, Any] | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Save weights (optionally cast, e.g. fp16 for bundling) and the JSON description of `model`."""
    s = stem(path)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    meta = description(model, extra)
    stamp = {"step": str(meta["step"])} if "step" in meta else None  # checked against the JSON by `load`
    atomic_write(s.with_name(s.name + ".safetensors"), lambda tmp: save_file(tensors, tmp, metadata=stamp))
    return write_meta(s, meta)


def description(model: torch.nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description `save` writes beside the weights (as JSON types: tuples become lists)."""
    return json.loads(json.dumps({"family": model.family, "config": to_dict(model.config), **(extra or {})}))


def write_meta(path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """(Re)write a checkpoint's JSON description atomically; returns the checkpoint's stem."""
    s = stem(path)
    atomic_write(s.with_name(s.name + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return s


def run_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A training run's description: its JSON, or the copy in its training state when the run's first save was
    cut before the JSON was written (the state is written first)."""
    s = stem(path)
    if s.with_name(s.name + ".json").exists() or not s.with_name(s.name + ".state.pt").exists():
        return read_meta(path)
    meta = load_state_file(path).get("meta")
    if meta is None:
        raise PargenError(f"{s} has a training state but no description {s.name}.json (a first save was cut "
                          f"short, by a pargen that kept no copy in the state); delete {s.name}.* to start again")
    return meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    s = stem(path)
    jpath = s.with_name(s.name + ".json")
    if not jpath.exists():
        raise PargenError(f"checkpoint {jpath} not found")
    try:
        meta = json.loads(jpath.read_text())
        meta["family"], meta["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise PargenError(f"checkpoint description {jpath} is corrupt ({e})") from None
    return meta


def config_of(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Any:
    """The model config a checkpoint describes (its JSON only: no weights read)."""
    s = stem(path)
    meta = read_meta(s) if meta is None else meta
    family = meta["family"]
    registry._ensure_loaded()
    if family not in registry.FAMILIES:
        raise PargenError(f"checkpoint {s}.json names unknown model family {family!r}")
    try:
        return from_dict(registry.FAMILIES[family].Config, meta["config"])
    except (PargenError, TypeError, ValueError) as e:
        raise PargenError(f"checkpoint {s}.json has an invalid {family} config: {e}") from None


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, load its weights (cast to `dtype`), and return it in eval mode."""
    s = stem(path)
    meta = read_meta(s)
    cfg = config_of(s, meta)
    try:
        model = registry.FAMILIES[meta["family"]](cfg)
    except (PargenError, TypeError, ValueError) as e:
        raise PargenError(f"checkpoint {s}.json has an invalid {meta['family']} config: {e}") from None
    wpath = s.with_name(s.name + ".safetensors")
    if not wpath.exists():
        raise PargenError(f"checkpoint weights {wpath} not found")
    try:
        state = load_file(str(wpath))
        with safe_open(str(wpath), "pt") as f:
            stamp = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError, ValueError) as e:
        raise PargenError(f"checkpoint weights {wpath} are unreadable (truncated or not safetensors): {e}") from None
    if stamp is not None and stamp != str(meta.get("step")):
        raise PargenError(f"{wpath} holds the weights of step {stamp} but {s}.json describes step "
                          f"{meta.get('step')}: a save was interrupted; `pargen train ... --resume` continues from "
                          "the training state and rewrites both")
    load_state(model, state, str(wpath))
    return model.to(dtype).eval(), meta


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` with a message that names the file and the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"wrong shape: {wrong[0]}")
        raise PargenError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    s = stem(path)
    atomic_write(s.with_name(s.name + ".state.pt"), lambda tmp: torch.save(state, tmp))


def load_state_file(path: str | os.PathLike) -> dict[str, Any]:
    s = stem(path)
    p = s.with_name(s.name + ".state.pt")
    if not p.exists():
        raise PargenError(f"training state {p} not found (cannot resume)")
    try:
        return torch.load(p, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise PargenError(f"training state {p} is unreadable: {e}") from None


BUNDLED = Path(__file__).parent / "checkpoints"


def resolve(name_or_path: str | os.PathLike, near: str | os.PathLike | None = None) -> Path:
    """A bundled checkpoint name (e.g. `tarflow-mnist`) or a path. `near`: the folder of the checkpoint that
    names this one (see `link`), where a relative path is looked up first."""
    tries = [stem(name_or_path)]
    if near is not None and not tries[0].is_absolute():
        tries.insert(0, Path(near) / tries[0])
    for p in tries:
        if p.with_name(p.name + ".json").exists():
            return p
    b = BUNDLED / str(name_or_path)
    if b.with_name(b.name + ".json").exists():
        return b
    if pipeline_dir(name_or_path) is not None:
        raise PargenError(f"{name_or_path} is a diffusers pipeline directory, not a pargen checkpoint: "
                          f"`pargen.load({str(name_or_path)!r})` in Python, `--diffusers {name_or_path}` here")
    bundled = sorted(q.stem for q in BUNDLED.glob("*.json") if q.with_suffix(".safetensors").exists())
    beside = f"not in {near}, beside the checkpoint that names it; " if near is not None else ""
    raise PargenError(f"no checkpoint {str(name_or_path)!r} ({beside}neither a path nor one of the bundled: "
                      f"{', '.join(bundled) or 'none'})")


def pipeline_dir(name_or_path: str | os.PathLike) -> Path | None:
    """The diffusers pipeline directory (`save_pretrained`: it holds model_index.json) at this path, or the
    bundled one of this name; None when there is none."""
    for d in (Path(name_or_path), BUNDLED / str(name_or_path)):
        if (d / "model_index.json").is_file():
            return d
    return None


def link(target: str | os.PathLike, ckpt: str | os.PathLike) -> str:
    """How checkpoint `ckpt` records another one it depends on (a tokenizer): a bundled one by its name, any
    other by its path relative to `ckpt`'s folder, so that the two can be moved together (`resolve(..., near=)`)."""
    t = stem(target)
    if is_bundled(t):
        return t.name
    return Path(os.path.relpath(t.resolve(), stem(ckpt).resolve().parent)).as_posix()


def user_dir() -> Path:
    """Where pargen writes what belongs to the user, not to a checkpoint they own: `$PARGEN_HOME`, else
    `$XDG_CACHE_HOME/pargen`, else `~/.cache/pargen`."""
    if os.environ.get("PARGEN_HOME"):
        return Path(os.environ["PARGEN_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pargen"


def is_bundled(path: str | os.PathLike) -> bool:
    return stem(path).resolve().parent == BUNDLED.resolve()


def record_path(ckpt: str | os.PathLike, suffix: str) -> Path:
    """Where a calibration record of `ckpt` (e.g. suffix `.plan.json`) is written: beside the checkpoint, or in
    the user directory for a bundled one (the installed package is never written to)."""
    s = stem(ckpt)
    if is_bundled(s):
        return user_dir() / "calibration" / (s.name + suffix)
    return s.with_name(s.name + suffix)


def find_record(ckpt: str | os.PathLike, suffix: str) -> Path | None:
    """The record `record_path` names if it was written, else the one shipped beside the checkpoint, else None."""
    s = stem(ckpt)
    for p in (record_path(s, suffix), s.with_name(s.name + suffix)):
        if p.exists():
            return p
    return None


def read_record(ckpt: str | os.PathLike, suffix: str) -> tuple[dict[str, Any] | None, Path | None]:
    """(the record as a dict, its path), or (None, None) when there is none."""
    p = find_record(ckpt, suffix)
    if p is None:
        return None, None
    try:
        return json.loads(p.read_text()), p
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PargenError(f"calibration record {p} is corrupt: {e}") from None


def write_record(ckpt: str | os.PathLike, suffix: str, doc: dict[str, Any]) -> Path:
    p = record_path(ckpt, suffix)
    atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return p
