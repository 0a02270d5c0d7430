"""Parallel (Picard) sampling for any `diffusers` pipeline, with the pipeline's own code doing every step.

    fast = pargen.diffusers.parallel(pipe, window=8, tol=1e-3)
    out = fast(prompt, num_inference_steps=50, generator=torch.Generator().manual_seed(0))   # pipe's own output
    fast.cost                                         # rounds, model evaluations, per-sweep residuals, tol

How: a pipeline's `__call__` is a triangular system over its denoiser calls: call i's input u_i follows from the
earlier calls' outputs by the pipeline's own code (guidance, masks, the scheduler's `step`). pargen runs that code
unchanged, many times ("replays"), with the denoiser replaced by a proxy:

- a replay starts from the same state: the user's generator(s) (or torch's global RNG) and the scheduler are
  restored to their state at the start of the call, so every random draw (initial latents, a stochastic
  scheduler's noise) is the same in every replay and the fixed point *is* the sequential answer;
- in a replay the proxy answers call i with the denoiser's output at the input u_i seen in the previous replay
  (all calls of a window were evaluated in one batched denoiser call) and records the new input u'_i;
- calls before the frontier are final (their outputs were evaluated at their true inputs); after a replay the
  frontier moves past every window call whose inputs changed by at most `tol` (at least one call per round);
- a ControlNet, called on the noisy input beside the denoiser at every step, is solved with it the same way (its
  calls batched per window), rather than run for real in every replay;
- calls the window has not reached get the latest output evaluated before them, a guess like any other; a
  replay stops once it has recorded every input the next window can need.

The scheduler's own `step` (any scheduler: multistep solvers keep their history because each replay runs from a
restored copy), the pipeline's guidance and conditioning are used as they are; nothing is re-implemented. Replays
cost no denoiser calls; text encoders and VAE encodes are memoised and the VAE decode is skipped until the final
replay. At `tol=0` the result equals the pipeline's own output up to the float rounding of batched denoiser calls.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import PargenError

DENOISERS = ("unet", "transformer", "prior", "decoder")  # the attribute a pipeline keeps its denoiser in
# models called on the noisy input beside the denoiser at every step, whose outputs feed it: solved with it (a
# ControlNet run for real in every replay would cost a model call per step per replay)
BESIDE = ("controlnet",)
TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")


@dataclass
class Cost:
    """What one parallel call cost, next to what the pipeline's own loop costs."""

    calls: int = 0  # model calls the pipeline makes (the sequential rounds): the denoiser's, and a ControlNet's
    rounds: int = 0  # dependent steps pargen made: one per window (one batched call per model), one per first call
    evaluations: int = 0  # model inputs evaluated (a window call of w inputs counts w)
    replays: int = 0  # runs of the pipeline's own loop (cheap: no denoiser calls)
    residuals: list[float] = field(default_factory=list)  # per round: the largest input change in the window
    window: int = 0
    tol: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Enough(BaseException):
    """Ends a replay once every input the next round can need is recorded (a BaseException, so that no
    `except Exception` in a pipeline swallows it)."""


@contextlib.contextmanager
def _quiet():
    """Silences the pipeline's warnings and diffusers' log in a replay that is not the last, so that what the
    pipeline says (a per-step warning, a deprecation) is said once, as by its own call, not once per replay."""
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _flatten(x: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(x, dict):
        return [kv for k in sorted(x) for kv in _flatten(x[k], f"{prefix}.{k}")]
    if isinstance(x, (list, tuple)):
        return [kv for i, v in enumerate(x) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, x)]


@dataclass
class _Call:
    """One model call, its arguments bound to the forward's parameter names; the first is the noisy input."""

    kwargs: dict
    first: str
    model: int = 0  # which of the solved models (the denoiser is 0)

    def sample(self) -> Tensor:
        return self.kwargs[self.first]


def _moved(new: _Call, old: _Call) -> float:
    """The largest RMS change between two recordings of a call, over every tensor input (the noisy input, and
    what earlier calls fed it, such as ControlNet residuals)."""
    a, b = _flatten(new.kwargs), _flatten(old.kwargs)
    return max((float((u - v).double().pow(2).mean().sqrt()) for (_, u), (_, v) in zip(a, b)
                if isinstance(u, Tensor) and u.is_floating_point() and isinstance(v, Tensor) and u.shape == v.shape),
               default=0.0)


def _rows(v: Any, b: int, name: str) -> Tensor | None:
    """v as b rows to concatenate, or None when it is not per-row (then it must be the same in every call)."""
    if name.endswith(("timestep", "timesteps", "t")) and not isinstance(v, bool) and isinstance(v, (int, float)):
        return torch.full((b,), v)
    if isinstance(v, Tensor):
        if name.endswith(("timestep", "timesteps")) and v.ndim == 0:
            return v.reshape(1).expand(b)
        if v.ndim and v.shape[0] == b:
            return v
    return None


def _batch(calls: list[_Call]) -> dict:
    """One call whose per-row tensors are the calls' concatenated (the shared values given once)."""
    b = [c.sample().shape[0] for c in calls]

    def merge(values: list[Any], name: str) -> Any:
        v0 = values[0]
        if isinstance(v0, dict):
            return {k: merge([v[k] for v in values], f"{name}.{k}") for k in v0}
        if isinstance(v0, (list, tuple)) and len(v0) and all(isinstance(v, type(v0)) and len(v) == len(v0)
                                                             for v in values):  # e.g. ControlNet residuals
            return type(v0)(merge([v[i] for v in values], f"{name}[{i}]") for i in range(len(v0)))
        rows = [_rows(v, n, name) for v, n in zip(values, b)]
        if all(r is not None for r in rows):
            dev = next((r.device for r in rows if r.device.type != "cpu"), rows[0].device)
            return torch.cat([r.to(dev) for r in rows])
        for v in values[1:]:
            same = (v is v0) or (isinstance(v, Tensor) and isinstance(v0, Tensor) and v.shape == v0.shape
                                 and bool(torch.equal(v, v0))) or (not isinstance(v, Tensor) and v == v0)
            if not same:
                raise PargenError(f"the denoiser's argument {name.lstrip('.')} changes between calls in a way "
                                  "pargen cannot batch (not one row per sample)")
        return v0

    return {k: merge([c.kwargs[k] for c in calls], k) for k in calls[0].kwargs}


def _split(out: Any, sizes: list[int]) -> list[Any]:
    """The batched call's output cut back into one output per call (tensors, nested in tuples, lists and diffusers
    outputs; anything else, such as None, is the same for every call)."""
    if isinstance(out, Tensor):
        return list(out.split(sizes))
    if type(out) in (tuple, list):
        parts = [_split(v, sizes) for v in out]
        return [type(out)(p[i] for p in parts) for i in range(len(sizes))]
    if dataclasses.is_dataclass(out):
        names = [f.name for f in dataclasses.fields(out)]
        parts = {k: _split(getattr(out, k), sizes) for k in names}
        return [type(out)(**{k: parts[k][i] for k in names}) for i in range(len(sizes))]
    if out is None or isinstance(out, (bool, int, float, str)):
        return [out] * len(sizes)
    raise PargenError(f"cannot split the denoiser's output of type {type(out).__name__}")


def _clone(out: Any) -> Any:
    """A fresh copy, so that in-place edits by the pipeline or scheduler cannot reach pargen's stored outputs."""
    if isinstance(out, Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(_clone(v) for v in out)
    if dataclasses.is_dataclass(out):
        return type(out)(**{f.name: _clone(getattr(out, f.name)) for f in dataclasses.fields(out)})
    return out


def _key(x: Any) -> Any:
    """A hashable key of (nested) call arguments, tensors by content."""
    if isinstance(x, Tensor):
        t = x.detach().cpu().contiguous()
        return ("T", tuple(t.shape), str(t.dtype), hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest()
                if t.numel() else "")
    if isinstance(x, dict):
        return tuple((k, _key(v)) for k, v in sorted(x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_key(v) for v in x)
    return x if isinstance(x, (int, float, str, bool, type(None))) else ("id", id(x))


def find_denoiser(pipe) -> tuple[str, torch.nn.Module]:
    for name in DENOISERS:
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            return name, m
    raise PargenError(f"{type(pipe).__name__} has no denoiser pargen knows ({', '.join(DENOISERS)}); it cannot be "
                      "run in parallel")


def solved_models(pipe) -> list[tuple[str, torch.nn.Module]]:
    """The models pargen answers from batched window calls: the denoiser, then any ControlNet beside it."""
    return [find_denoiser(pipe)] + [(n, getattr(pipe, n)) for n in BESIDE
                                    if isinstance(getattr(pipe, n, None), torch.nn.Module)]


class Parallel:
    """`pipe` with its denoising loop solved by Picard iteration over windows of denoiser calls."""

    def __init__(self, pipe, method: str = "picard", window: int = 8, tol: float = 1e-3, max_rounds: int | None = None,
                 tol_scale: str = "none"):
        if method not in ("picard", "sequential"):
            raise PargenError(f"method must be 'picard' or 'sequential', not {method!r}")
        if window < 1:
            raise PargenError(f"window must be >= 1, not {window}")
        if not (tol >= 0 and math.isfinite(tol)):
            raise PargenError(f"tol must be a finite number >= 0, not {tol}")
        if not callable(getattr(pipe, "__call__", None)) or not hasattr(pipe, "scheduler"):
            raise PargenError(f"{type(pipe).__name__} is not a diffusers pipeline with a scheduler")
        if tol_scale not in ("none", "noise"):
            raise PargenError(f"tol_scale must be 'none' or 'noise', not {tol_scale!r}")
        self.pipe, self.method, self.window, self.tol, self.max_rounds = pipe, method, window, tol, max_rounds
        self.tol_scale = tol_scale
        self.models = solved_models(pipe)
        self.denoiser_name, self.denoiser = self.models[0]
        self.cost = Cost()

    def __repr__(self) -> str:
        return f"pargen.diffusers.parallel({type(self.pipe).__name__}, method={self.method!r}, window={self.window}, " \
               f"tol={self.tol:g}) over {type(self.pipe.scheduler).__name__}"

    @staticmethod
    def _restorer(generator) -> Callable[[], None]:
        """A function that puts the random state back where it is now: the user's generator(s), else torch's."""
        gens = generator if isinstance(generator, (list, tuple)) else [generator] if generator is not None else []
        if gens and not all(isinstance(g, torch.Generator) for g in gens):
            raise PargenError("generator must be a torch.Generator or a list of them")
        if gens:
            states = [g.get_state() for g in gens]

            def restore():
                for g, s in zip(gens, states):
                    g.set_state(s)
            return restore
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

        def restore_global():
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        return restore_global

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's own `__call__`, same arguments and output (with `.pargen`, the cost, attached)."""
        pipe = self.pipe
        restore = self._restorer(kwargs.get("generator"))
        sched0 = copy.deepcopy(pipe.scheduler.__dict__)
        reals = [m.forward for _, m in self.models]
        cost = Cost(window=self.window, tol=self.tol)
        inputs: list[_Call] = []  # the latest replay's model call inputs, in call order
        outputs: dict[int, Any] = {}  # evaluated outputs, by call index
        latest: dict[int, int] = {}  # per model, the index of its latest evaluated call (a guess for later ones)
        state = {"mode": "record", "i": 0, "stop": None}

        def make_proxy(m: int):
            real = reals[m]
            sig = inspect.signature(real)
            first = next(iter(sig.parameters))

            def proxy(*a, **k):
                i = state["i"]
                if state["stop"] is not None and i >= state["stop"]:
                    raise _Enough
                state["i"] += 1
                try:
                    bound = dict(sig.bind(*a, **k).arguments)
                except TypeError as e:
                    raise PargenError(f"cannot read the {self.models[m][0]}'s arguments: {e}") from None
                extra = bound.pop(next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None), {})
                if not isinstance(bound.get(first), Tensor):
                    raise PargenError(f"the {self.models[m][0]}'s first argument {first!r} is not a tensor; pargen "
                                      "cannot batch this pipeline's calls")
                call = _Call({**bound, **extra, first: bound[first].clone()}, first, m)
                if state["mode"] == "real":  # the pipeline's own loop, counted
                    inputs.append(call)
                    cost.rounds += 1
                    cost.evaluations += 1
                    return real(*a, **k)
                if state["mode"] == "first":  # the first call of each model for real, later ones get its output
                    if m not in latest:
                        outputs[i], latest[m] = _clone(real(*a, **k)), i
                        cost.rounds += 1
                        cost.evaluations += 1
                    inputs.append(call)
                    return _clone(outputs[latest[m]])
                if i < len(inputs):
                    inputs[i] = call
                else:
                    inputs.append(call)
                return _clone(outputs[i if i in outputs else latest[m]])
            return proxy

        patched: list[tuple[Any, str, Any]] = []
        missing = object()

        def patch(obj, name, fn):  # an instance attribute over the class's method, undone in `finally`
            patched.append((obj, name, obj.__dict__.get(name, missing)))
            setattr(obj, name, fn)

        memo: dict[Any, Any] = {}

        def memoised(module, fname):
            orig = getattr(module, fname)

            def f(*a, **k):
                key = (id(module), fname, _key(a), _key(k))
                if key not in memo:
                    memo[key] = orig(*a, **k)
                return memo[key]
            return f

        decode = {"skip": True}
        vae = getattr(pipe, "vae", None)

        def replay(final: bool = False, stop: int | None = None):
            """The pipeline's own call from the starting state; a partial one ends before denoiser call `stop`."""
            restore()
            pipe.scheduler.__dict__.clear()
            pipe.scheduler.__dict__.update(copy.deepcopy(sched0))
            state["i"], state["stop"] = 0, stop
            decode["skip"] = not final
            cost.replays += 1
            try:
                with contextlib.nullcontext() if final else _quiet():
                    return pipe(*args, **kwargs)
            except _Enough:
                return None

        progress = getattr(pipe, "_progress_bar_config", None)
        try:
            pipe.set_progress_bar_config(disable=True)
            for m, (_, module) in enumerate(self.models):
                patch(module, "forward", make_proxy(m))
            for name in TEXT:
                m = getattr(pipe, name, None)
                if isinstance(m, torch.nn.Module):
                    patch(m, "forward", memoised(m, "forward"))
            if isinstance(vae, torch.nn.Module) and hasattr(vae, "decode"):
                real_decode, real_encode = vae.decode, getattr(vae, "encode", None)
                if real_encode is not None:
                    patch(vae, "encode", memoised(vae, "encode"))

                def fake_decode(z, *a, **k):
                    if not decode["skip"]:
                        return real_decode(z, *a, **k)
                    f = getattr(pipe, "vae_scale_factor", 8)
                    c = getattr(vae.config, "out_channels", 3)
                    img = torch.zeros(z.shape[0], c, z.shape[-2] * f, z.shape[-1] * f, device=z.device, dtype=z.dtype)
                    return (img,) if k.get("return_dict", True) is False else _decoded(img)
                patch(vae, "decode", fake_decode)

            if self.method == "sequential":
                state["mode"] = "real"
                out = replay(final=True)
                cost.calls = len(inputs)
            else:
                out = self._solve(replay, state, inputs, outputs, latest, reals, cost)
        except ValueError as e:  # the pipeline's own checks (prompt / generator / image mismatches ...)
            raise PargenError(f"{type(pipe).__name__}: {e}") from None
        finally:
            for obj, name, before in reversed(patched):
                if before is missing:
                    obj.__dict__.pop(name, None)
                else:
                    obj.__dict__[name] = before
            if progress is not None:
                pipe._progress_bar_config = progress
            else:
                pipe.__dict__.pop("_progress_bar_config", None)
        self.cost = cost
        try:
            object.__setattr__(out, "pargen", cost)
        except (AttributeError, TypeError):
            pass
        return out

    def _solve(self, replay, state, inputs: list[_Call], outputs: dict[int, Any], latest: dict[int, int],
               reals: list[Callable], cost: Cost) -> Any:
        state["mode"] = "first"
        replay()
        n = len(inputs)
        cost.calls = n
        if n == 0:
            raise PargenError(f"{type(self.pipe).__name__} never called its {self.denoiser_name}; nothing to solve")
        state["mode"] = "window"
        span = self.window * len(self.models)  # a window of w steps: w calls of each solved model
        c = 1  # calls < c are final; call c's recorded input is exact (it follows from final calls only)
        scale = self._scales(inputs)
        while c < n:
            if self.max_rounds is not None and cost.rounds >= self.max_rounds:
                raise PargenError(f"no convergence within {self.max_rounds} rounds (window {self.window}, tol "
                                  f"{self.tol:g})")
            hi = min(n, c + span)
            for m, real in enumerate(reals):  # one batched call per model, all at the recorded inputs
                idx = [i for i in range(c, hi) if inputs[i].model == m]
                if idx:
                    batch = [inputs[i] for i in idx]
                    for i, o in zip(idx, _split(real(**_batch(batch)), [x.sample().shape[0] for x in batch])):
                        outputs[i] = o
                    latest[m] = idx[-1]
            cost.rounds += 1
            cost.evaluations += hi - c
            old = inputs[c:hi]
            replay(stop=hi + span)  # the next window starts at or before hi
            errs = [_moved(inputs[i], o) / s for i, o, s in zip(range(c, hi), old, scale[c:hi])]
            cost.residuals.append(max(errs, default=0.0))
            step = 1  # call c was evaluated at its true input: final
            while c + step < hi and errs[step] <= self.tol:
                step += 1
            c += step
        return replay(final=True)

    def _scales(self, inputs: list[_Call]) -> list[float]:
        """Per call, what `tol` is relative to: 1 (an absolute RMS change of the denoiser's input), or with
        tol_scale="noise" the noise std the scheduler adds at that call's timestep (ParaDiGMS' and diffusers'
        StableDiffusionParadigmsPipeline's convention; DDPM-family schedulers only)."""
        if self.tol_scale == "none":
            return [1.0] * len(inputs)
        sched = self.pipe.scheduler
        var = getattr(sched, "_get_variance", None)
        if var is None or "prev_timestep" in inspect.signature(var).parameters:
            raise PargenError(f"tol_scale='noise' needs a DDPM-family scheduler (one noise variance per timestep); "
                              f"{type(sched).__name__} has none")
        out = []
        for call in inputs:
            t = call.kwargs.get("timestep", call.kwargs.get("t"))
            t = int(t.reshape(-1)[0]) if isinstance(t, Tensor) else int(t)
            out.append(max(float(var(t)), 1e-20) ** 0.5)
        return out


def _decoded(img: Tensor):
    try:
        from diffusers.models.autoencoders.vae import DecoderOutput
    except ImportError:  # older layouts
        from diffusers.models.vae import DecoderOutput
    return DecoderOutput(sample=img)


def parallel(pipe, method: str = "picard", window: int = 8, tol: float = 1e-3, max_rounds: int | None = None,
             tol_scale: str = "none") -> Parallel:
    """`pipe` (any diffusers pipeline) with its denoiser calls solved in parallel windows; call it as the pipeline.

    method: "picard" (sliding window of `window` steps, one batched call per model: the denoiser and a ControlNet)
    or "sequential" (the pipeline itself, counted). tol: largest RMS change of a call's inputs between rounds for
    it to count as final (0: exact up to the float rounding of batched calls); tol_scale="noise": relative to the
    scheduler's noise std at that step, as ParaDiGMS (DDPM-family schedulers). The pipeline's own code runs once
    per replay, a `callback_on_step_end` included: it may edit the latents, so it is part of the system solved, and
    its side effects (a preview saved, a line logged) happen in every replay."""
    return Parallel(pipe, method, window, tol, max_rounds, tol_scale)


# ---- local pipeline directories: loading, the call for a list of seeds, calibration and the bench

RECORD = "pargen_calibration.json"  # beside the pipeline's model_index.json


def load_pipeline(path: str, device: str = "cpu", scheduler: str | None = None,
                  dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local directory (`save_pretrained`), optionally with another scheduler class
    built from its scheduler's config (e.g. "DPMSolverMultistepScheduler"); never downloads."""
    from .checkpoint import pipeline_dir

    root = pipeline_dir(path)
    if root is None:
        raise PargenError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PargenError(f"cannot load the pipeline in {path}: {str(e).splitlines()[0]}") from None
    find_denoiser(pipe)
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config") or not scheduler.endswith("Scheduler"):
            raise PargenError(f"diffusers has no scheduler {scheduler!r}")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def call_args(pipe, seeds: list[int], labels: list[int] | None = None, prompt: str | None = None,
              steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    """Keyword arguments of `pipe(...)` for these seeds: one generator per image (an image depends on its seed
    only), and what the pipeline takes of labels, prompt, steps and guidance."""
    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = {"generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "np"}
    if "class_labels" in params:
        if not labels:
            raise PargenError(f"{type(pipe).__name__} is class-conditional; give --labels")
        kw["class_labels"] = [labels[i % len(labels)] for i in range(len(seeds))]
    elif labels:
        raise PargenError(f"{type(pipe).__name__} takes no class labels")
    if "prompt" in params:
        kw["prompt"] = [prompt or ""] * len(seeds)
    elif prompt:
        raise PargenError(f"{type(pipe).__name__} takes no prompt")
    elif "batch_size" in params:
        kw["batch_size"] = len(seeds)
    if steps is not None:
        kw["num_inference_steps"] = steps
    if guidance is not None:
        if "guidance_scale" not in params:
            raise PargenError(f"{type(pipe).__name__} takes no guidance scale")
        kw["guidance_scale"] = guidance
    return kw


def images(out) -> Tensor:
    """A pipeline output's images as (N, C, H, W) float32 in [0, 1]."""
    x = out.images if hasattr(out, "images") else out[0]
    x = torch.as_tensor(x).float()
    return x.permute(0, 3, 1, 2).contiguous() if x.shape[-1] in (1, 3, 4) else x


def sample(path: str, pipe, seeds: list[int], method: str = "auto", batch_size: int = 16, steps: int | None = None,
           guidance: float | None = None, window: int | None = None, tol: float | None = None,
           labels: list[int] | None = None, prompt: str | None = None) -> tuple[Tensor, dict[str, Any], str]:
    """(images (N, C, H, W) in [0, 1], cost per batch (mean), description) of a pipeline directory's pipeline for
    these seeds, in batches; `method="auto"` follows the directory's calibration record."""
    from tqdm import tqdm

    from .pipelines import check_finite

    st = settings(path, pipe, method, min(batch_size, len(seeds)), steps, guidance, window, tol)
    fast = parallel(pipe, st["method"], st["window"], st["tol"])
    imgs, costs = [], []
    for i in tqdm(range(0, len(seeds), batch_size), desc="sample", leave=False, disable=len(seeds) <= batch_size):
        imgs.append(images(fast(**call_args(pipe, seeds[i: i + batch_size], labels, prompt, steps, guidance))))
        check_finite(imgs[-1], seeds[i: i + batch_size], f"{type(pipe).__name__} ({st['method']})")
        costs.append(fast.cost)
    how = "sequential (the pipeline's own loop)" if st["method"] == "sequential" else \
        f"Picard (window {st['window']}, tol {st['tol']:g}{', calibrated' if st['calibrated'] else ''})"
    cost = {k: sum(getattr(c, k) for c in costs) / len(costs) for k in ("rounds", "calls", "evaluations")}
    return torch.cat(imgs), {**cost, **st}, f"{type(pipe).__name__} + {type(pipe.scheduler).__name__}, {how}"


class DiffusersDirectory:
    """A local diffusers pipeline directory behind the calls of `pargen.load`'s pipelines (`sample` returns the
    same `Output`; `calibrate` and `bench` write and return the same records): `pargen.load(DIR)` gives one."""

    family = "diffusers"
    methods = ("auto", "sequential", "picard")

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 scheduler: str | None = None):
        self.path, self.pipe = str(path), load_pipeline(path, device, scheduler, dtype)
        self.name = self.path.rstrip("/").rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"DiffusersDirectory({self.name!r}, {type(self.pipe).__name__} + {type(self.pipe.scheduler).__name__})"

    def sample(self, seeds: int | list[int] = 16, labels: list[int] | None = None, method: str = "auto",
               batch_size: int = 16, steps: int | None = None, guidance: float | None = None,
               window: int | None = None, tol: float | None = None, prompt: str | None = None):
        """Images for `seeds` (one generator per seed), `method="auto"` as the directory's calibration says."""
        from .pipelines import Output, seed_list

        seeds = seed_list(seeds)
        x, cost, desc = sample(self.path, self.pipe, seeds, method, batch_size, steps, guidance, window, tol,
                               list(labels) if labels is not None else None, prompt)
        y = None if labels is None else torch.tensor([list(labels)[i % len(labels)] for i in range(len(seeds))])
        st = {k: cost[k] for k in ("method", "window", "tol", "calibrated")}
        return Output(x, seeds, y, st["method"], {**st, "steps": steps, "guidance": guidance},
                      {k: cost[k] for k in ("rounds", "calls", "evaluations")}, desc)

    def calibrate(self, steps: int | None = None, guidance: float | None = None, **kw: Any) -> dict[str, Any]:
        """The window and tolerance within `max_err` of the pipeline's own images (see `calibrate`)."""
        return calibrate(self.path, self.pipe, steps, guidance, **kw)

    def bench(self, batches: list[int] = (1, 16), repeats: int = 5, steps: int | None = None,
              guidance: float | None = None, **kw: Any) -> list[dict[str, Any]]:
        """The pipeline's own loop against Picard, interleaved (see `bench`)."""
        return bench(self.path, self.pipe, steps, guidance, list(batches), repeats, **kw)


def _record_key(pipe, steps: int | None, guidance: float | None) -> str:
    return f"{type(pipe.scheduler).__name__}/{steps}/{guidance}"


def read_record(path: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    p = Path(path) / RECORD
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PargenError(f"calibration record {p} is corrupt: {e}") from None


def settings(path: str, pipe, method: str, batch: int, steps: int | None, guidance: float | None,
             window: int | None = None, tol: float | None = None) -> dict[str, Any]:
    """method "auto": the calibrated window and tolerance for this scheduler, steps and guidance up to the batch
    where they were measured to win, else the pipeline's own sequential loop. Explicit windows / tols win."""
    if method not in ("auto", "sequential", "picard"):
        raise PargenError(f"a diffusers pipeline samples with method auto, sequential or picard, not {method!r}")
    rec = read_record(path).get(_record_key(pipe, steps, guidance), {})
    if method == "auto":
        method = "picard" if rec and batch <= rec.get("max_batch", 0) else "sequential"
    return {"method": method, "window": window or rec.get("window", 8), "tol": rec.get("tol", 1e-3) if tol is None
            else tol, "calibrated": bool(rec)}


def calibrate(path: str, pipe, steps: int | None, guidance: float | None, max_err: float = 2e-3, seeds: int = 4,
              batches: list[int] = (1, 2, 4, 16), seed: int = 1000, prompt: str | None = None,
              labels: list[int] | None = None, repeats: int = 3, log=print) -> dict[str, Any]:
    """Per window, the loosest tolerance whose images stay within `max_err` (max abs on the [-1, 1] scale) of the
    pipeline's own images on `seeds` images; the fastest at batch 1 is stored in DIR/pargen_calibration.json with
    the largest batch at which it still beats the sequential loop by more than timing noise."""
    import json
    from pathlib import Path

    from .evaluation.bench import median_seconds
    from .evaluation.calibrate import picard_setting

    ss = list(range(seed, seed + seeds))

    def run(s, **p):
        return images(parallel(pipe, **p)(**call_args(pipe, s, labels, prompt, steps, guidance)))

    def timed(s, **p) -> float:
        return median_seconds(lambda: run(s, **p), repeats)[1]

    def error(w: int, tol: float) -> tuple[float, dict[str, Any]]:
        fast = parallel(pipe, window=w, tol=tol)
        got = images(fast(**call_args(pipe, ss, labels, prompt, steps, guidance)))
        return float((got - ref).abs().max()) * 2, {"rounds": fast.cost.rounds, "calls": fast.cost.calls}

    def batch_seconds(B: int, w: int, tol: float) -> tuple[float, float]:
        sb = list(range(seed, seed + B))
        return timed(sb, method="sequential"), timed(sb, window=w, tol=tol)

    ref = run(ss, method="sequential")
    seq_s = timed(ss[:1], method="sequential")
    log(f"{type(pipe).__name__} + {type(pipe.scheduler).__name__}: sequential {seq_s * 1e3:.0f} ms at batch 1; "
        f"max abs error allowed {max_err:g} on {seeds} seeds")
    rec = {"seeds": seeds, **picard_setting(error, lambda w, tol: timed(ss[:1], window=w, tol=tol), seq_s, max_err,
                                            batches, batch_seconds, f"calibrate {type(pipe.scheduler).__name__}",
                                            log)}
    doc = read_record(path)
    doc[_record_key(pipe, steps, guidance)] = rec
    out = Path(path) / RECORD
    from .checkpoint import atomic_write

    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    log("  -> " + (f"window {rec['window']}, tol {rec['tol']:g}, up to batch {rec['max_batch']}" if rec["max_batch"]
                    else "sequential at every batch size") + f"; saved to {out}")
    return rec


def bench(path: str, pipe, steps: int | None, guidance: float | None, batches: list[int], repeats: int,
          seed: int = 0, window: int | None = None, tol: float | None = None, prompt: str | None = None,
          labels: list[int] | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """The pipeline's own loop against Picard (the calibrated or given window and tolerance), interleaved."""
    from .evaluation import bench as benchmod

    records = []
    for B in batches:
        st = settings(path, pipe, "picard", B, steps, guidance, window, tol)
        ss = list(range(seed, seed + B))

        def runner(**p):
            fast = parallel(pipe, **p)

            def go():
                out = images(fast(**call_args(pipe, ss, labels, prompt, steps, guidance)))
                return out * 2 - 1, {"rounds": fast.cost.rounds, "nfe": fast.cost.evaluations,
                                     "calls": fast.cost.calls}
            return go

        info = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "steps": steps,
                "guidance": guidance}
        records += benchmod.run("diffusers", benchmod.Method("sequential", runner(method="sequential"), info),
                                [benchmod.Method("picard", runner(window=st["window"], tol=st["tol"]),
                                                 {**info, "window": st["window"], "tol": st["tol"],
                                                  "calibrated": st["calibrated"]})],
                                batch=B, seed=seed, repeats=repeats, progress=progress)
    return records
