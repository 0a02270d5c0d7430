"""Parallel (Picard) sampling for any `diffusers` pipeline, with the pipeline's and the scheduler's own code.

    fast = pargen.diffusers.parallel(pipe, window=8, tol=1e-3)
    out = fast(prompt, num_inference_steps=50, generator=torch.Generator().manual_seed(0))   # pipe's own output
    fast.cost                           # path, rounds, model evaluations, residuals, seconds outside model calls

A pipeline's denoising loop is a triangular system over its denoiser calls: call i's input follows from the earlier
calls' outputs by the pipeline's code (guidance, the scheduler's `step`). Picard rounds evaluate a window of calls
in one batched denoiser call, recompute the inputs from those outputs, and slide the window past every call whose
input moved by at most `tol` (at least one per round). Every random draw comes from the same generator state as in
the sequential call, so the fixed point *is* the pipeline's answer. Two ways to recompute the inputs:

- driven (`_drive`; the pipeline classes in TEMPLATES): the pipeline's own call runs once to its first scheduler
  step (prompts encoded, latents drawn, timesteps set), and what the template makes of that step (guidance
  copies, `scale_model_input`, the timestep format, the guidance formula) is checked bit-equal against what the
  pipeline made. A round is then the batched call and the scheduler's own `step` through the window from a saved
  copy of its state at the frontier (multistep histories and stochastic noise as in the sequential loop), later
  steps taken on the latest output as guesses for the next window. The pipeline's call runs once more with every
  denoiser call and step answered from the solution, for its own decoding and output. DDPMPipeline and
  DDIMPipeline skip the scheduler protocol (init_noise_sigma, scale_model_input); pargen applies it.
- replayed (`_solve`; any other pipeline, a ControlNet, a step callback): the pipeline's whole call per round
  ("replay") with its models answered by proxies from the batched window calls, the generator(s) and the
  scheduler restored before each; a ControlNet is solved with the denoiser (its calls batched per window too).

Text encoders and VAE encodes are memoised and the VAE decode is skipped until the final run. At `tol=0` the
result equals the pipeline's own output up to the float rounding of batched denoiser calls.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import PargenError

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
    path: str = ""  # "driven" (the scheduler's step per round), "replay" (the pipeline's loop per round), "pipeline"
    why: str | None = None  # why a pipeline was replayed rather than driven
    model_s: float = 0.0  # seconds inside batched model calls
    loop_s: float = 0.0  # seconds of the round loop (model calls included)
    wall_s: float = 0.0  # seconds of the whole call (preparation and decoding included)
    overhead_s: float = 0.0  # seconds per round outside model calls: (loop_s - model_s) / rounds

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


class _RNG:
    """The random state a pipeline draws from: the user's generator(s), else torch's global one."""

    def __init__(self, generator):
        gens = generator if isinstance(generator, (list, tuple)) else [generator] if generator is not None else []
        if gens and not all(isinstance(g, torch.Generator) for g in gens):
            raise PargenError("generator must be a torch.Generator or a list of them")
        self.gens = list(gens)

    def get(self) -> Any:
        if self.gens:
            return [g.get_state() for g in self.gens]
        return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def set(self, state: Any) -> None:
        if self.gens:
            for g, st in zip(self.gens, state):
                g.set_state(st)
            return
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])


@dataclass(frozen=True)
class _Template:
    """What a pipeline class's loop body does around its one denoiser call per step, read from its `__call__` in
    diffusers and checked against the pipeline's own step 0 on every call:
    latents L -> denoiser input x (guidance copies, `scale_model_input`) -> output -> the scheduler's
    `model_output` (guidance) -> `step(model_output, t, L or x)`."""

    copies: str  # "cat": [L, L] under classifier-free guidance; "dit": DiTPipeline's [half, half]; "none"
    scale: bool  # the loop calls scheduler.scale_model_input on x
    guide: str  # "cfg": uncond + w (cond - uncond) on halves (+ guidance_rescale); "dit"; "none"
    time: str  # the denoiser's timestep: "t" (as is), "rows" (t per row), "rows/1000" (FLUX)
    step_on_input: bool = False  # DiTPipeline steps x (its guidance copies, scaled), not L
    protocol: bool = False  # the pipeline's loop skips the scheduler protocol: pargen applies it (see `_plan`)


_SD = _Template("cat", True, "cfg", "t")
TEMPLATES = {
    "DDPMPipeline": _Template("none", True, "none", "t", protocol=True),
    "DDIMPipeline": _Template("none", True, "none", "t", protocol=True),
    "StableDiffusionPipeline": _SD, "StableDiffusionImg2ImgPipeline": _SD, "StableDiffusionXLPipeline": _SD,
    "StableDiffusion3Pipeline": _Template("cat", False, "cfg", "rows"),
    "FluxPipeline": _Template("none", False, "none", "rows/1000"),
    "DiTPipeline": _Template("dit", True, "dit", "rows", step_on_input=True),
}
# arguments under which a driven pipeline's loop does more than its template: it is replayed instead
LOOP_EXTRAS = ("callback_on_step_end", "callback", "skip_guidance_layers", "denoising_end")


@dataclass
class _Plan:
    """A pipeline call read off its first step: what driven rounds need."""

    tpl: _Template
    kwargs: dict  # the denoiser's call-0 arguments (the conditioning shared by every call)
    first: str  # the denoiser's noisy-input argument
    latents: Tensor  # L before step 0
    x0: Tensor  # the denoiser's input at step 0
    out0: Any  # the denoiser's output at step 0 (None: not evaluated yet)
    timesteps: Tensor  # the loop's timesteps
    step_kw: dict  # what the loop passes to `step` beside (model_output, timestep, sample)
    sched: dict  # the scheduler's state before step 0
    rng: Any  # the random state before step 0
    guidance: float  # the guidance scale the loop applies
    rescale: float  # guidance_rescale (SD, SDXL)
    guided: bool  # two guidance branches per sample


class _Session:
    """One call of the pipeline under pargen: its models' forwards replaced by proxies (undone on exit), text
    encoders and VAE encodes memoised, the VAE decode skipped except in the final run, and `replay` to run the
    pipeline's own call again from the call's starting state (random state and scheduler restored)."""

    def __init__(self, par: "Parallel", args: tuple, kwargs: dict):
        self.par, self.pipe, self.args, self.kwargs = par, par.pipe, args, kwargs
        self.rng = _RNG(kwargs.get("generator"))
        self.rng0 = self.rng.get()
        self.sched0 = copy.deepcopy(self.pipe.scheduler.__dict__)
        self.reals = [m.forward for _, m in par.models]
        self.cost = Cost(window=par.window, tol=par.tol)
        self.inputs: list[_Call] = []  # the latest replay's model call inputs, in call order
        self.outputs: dict[int, Any] = {}  # evaluated outputs, by call index
        self.latest: dict[int, int] = {}  # per model, its latest evaluated call (the guess for later ones)
        self.state: dict[str, Any] = {"mode": "real", "i": 0, "stop": None, "decode": False}
        self.rec: dict[str, Any] = {}
        self.answers: tuple[dict, list] = ({}, [])
        self._patched: list[tuple[Any, str, Any]] = []

    _missing = object()

    def _patch(self, obj, name, fn):  # an instance attribute over the class's method, undone on exit
        self._patched.append((obj, name, obj.__dict__.get(name, self._missing)))
        setattr(obj, name, fn)

    def _proxy(self, m: int) -> Callable:
        real, st, cost = self.reals[m], self.state, self.cost
        sig = inspect.signature(real)
        first = next(iter(sig.parameters))
        what = self.par.models[m][0]

        def proxy(*a, **k):
            i = st["i"]
            if st["stop"] is not None and i >= st["stop"]:
                raise _Enough
            st["i"] += 1
            mode = st["mode"]
            if mode == "answer":
                outs = self.answers[0]
                if i not in outs:
                    raise PargenError(f"{type(self.pipe).__name__} called its {what} more often than its first run")
                return _clone(outs[i])
            try:
                bound = dict(sig.bind(*a, **k).arguments)
            except TypeError as e:
                raise PargenError(f"cannot read the {what}'s arguments: {e}") from None
            extra = bound.pop(next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None), {})
            if not isinstance(bound.get(first), Tensor):
                raise PargenError(f"the {what}'s first argument {first!r} is not a tensor; pargen cannot batch "
                                  "this pipeline's calls")
            call = _Call({**bound, **extra, first: bound[first].clone()}, first, m)
            if mode == "record":
                if i > 0:  # a second denoiser call before the scheduler's step: not one call per step
                    self.rec["twice"] = True
                    raise _Enough
                self.rec["call"] = call
                if self.rec["protocol"]:
                    self.rec.update(sched=self._sched_state(), rng=self.rng.get())
                    raise _Enough
            if mode in ("real", "record") or (mode == "first" and m not in self.latest):
                t0 = time.perf_counter()
                out = real(*a, **k)
                cost.model_s += time.perf_counter() - t0
                cost.rounds += 1
                cost.evaluations += 1
                if mode == "real":
                    self.inputs.append(call)
                    return out
                self.outputs[i], self.latest[m] = _clone(out), i
                if mode == "record":
                    self.rec["out"] = self.outputs[i]
            if i < len(self.inputs):
                self.inputs[i] = call
            else:
                self.inputs.append(call)
            return _clone(self.outputs[i if i in self.outputs else self.latest[m]])
        return proxy

    def _sched_state(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.pipe.scheduler.__dict__.items() if k != "step"})

    def _step_proxy(self) -> Callable:
        sched, st = self.pipe.scheduler, self.state
        sig = inspect.signature(type(sched).step)

        def step(*a, **k):
            if st["mode"] == "record":
                self.rec["step"] = {k: v for k, v in sig.bind(sched, *a, **k).arguments.items() if k != "self"}
                self.rec.update(sched=self._sched_state(), rng=self.rng.get())
                raise _Enough
            j, steps = st["j"], self.answers[1]
            st["j"] += 1
            if j >= len(steps):
                raise PargenError(f"{type(self.pipe).__name__} stepped its scheduler more often than its first run")
            return steps[j]
        step.__signature__ = inspect.signature(sched.step)  # the pipeline reads it (does step take a generator?)
        return step

    def __enter__(self) -> "_Session":
        pipe = self.pipe
        self._progress = getattr(pipe, "_progress_bar_config", None)
        pipe.set_progress_bar_config(disable=True)
        for m, (_, module) in enumerate(self.par.models):
            self._patch(module, "forward", self._proxy(m))
        memo: dict[Any, Any] = {}

        def memoised(module, fname):
            orig = getattr(module, fname)

            def f(*a, **k):
                key = (id(module), fname, _key(a), _key(k))
                if key not in memo:
                    memo[key] = orig(*a, **k)
                return memo[key]
            return f

        for name in TEXT:
            m = getattr(pipe, name, None)
            if isinstance(m, torch.nn.Module):
                self._patch(m, "forward", memoised(m, "forward"))
        vae = getattr(pipe, "vae", None)
        if isinstance(vae, torch.nn.Module) and hasattr(vae, "decode"):
            real_decode = vae.decode
            if getattr(vae, "encode", None) is not None:
                self._patch(vae, "encode", memoised(vae, "encode"))

            def fake_decode(z, *a, **k):
                if self.state["decode"]:
                    return real_decode(z, *a, **k)
                f = getattr(pipe, "vae_scale_factor", 8)
                c = getattr(vae.config, "out_channels", 3)
                img = torch.zeros(z.shape[0], c, z.shape[-2] * f, z.shape[-1] * f, device=z.device, dtype=z.dtype)
                return (img,) if k.get("return_dict", True) is False else _decoded(img)
            self._patch(vae, "decode", fake_decode)
        return self

    def __exit__(self, kind, e, tb) -> bool:
        for obj, name, before in reversed(self._patched):
            if before is self._missing:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = before
        pipe = self.pipe
        if self._progress is not None:
            pipe._progress_bar_config = self._progress
        else:
            pipe.__dict__.pop("_progress_bar_config", None)
        if kind is ValueError:  # the pipeline's own checks (prompt / generator / image mismatches ...)
            raise PargenError(f"{type(pipe).__name__}: {e}") from None
        return False

    def replay(self, mode: str, final: bool = False, stop: int | None = None, outputs: dict | None = None,
               steps: list | None = None) -> Any:
        """The pipeline's own call from the starting state; a partial one ends before model call `stop`.
        mode: "real" (its models run), "first" (each model's first call runs, later ones get its output),
        "window" (calls answered from `outputs`, inputs recorded), "record" (up to the first step's arguments),
        "answer" (every model call and every step answered from a solution)."""
        sched, st = self.pipe.scheduler, self.state
        self.rng.set(self.rng0)
        sched.__dict__.clear()
        sched.__dict__.update(copy.deepcopy(self.sched0))
        st.update(mode=mode, i=0, j=0, stop=stop, decode=final)
        if mode in ("record", "answer"):
            sched.__dict__["step"] = self._step_proxy()
            if mode == "answer":
                self.answers = (outputs, steps)
        self.cost.replays += mode != "real"
        try:
            with contextlib.nullcontext() if final else _quiet():
                return self.pipe(*self.args, **self.kwargs)
        except _Enough:
            return None
        finally:
            sched.__dict__.pop("step", None)

    def record(self, tpl: _Template) -> "_Plan | str":
        """The pipeline's call up to its first scheduler step (its preparation: prompts encoded, latents drawn,
        timesteps set), read into a plan for driven rounds, or why it cannot be driven."""
        pipe, sched, par = self.pipe, self.pipe.scheduler, self.par
        self.rec = {"protocol": tpl.protocol}
        self.replay(mode="record")
        rec = self.rec
        if rec.get("twice"):
            return f"{type(pipe).__name__} calls its {par.denoiser_name} more than once per step"
        if "call" not in rec or "sched" not in rec:
            return f"{type(pipe).__name__} never reached its scheduler's step"
        call: _Call = rec["call"]
        state = rec["sched"]
        params = inspect.signature(type(sched).step).parameters
        sched.__dict__.clear()
        sched.__dict__.update(state)
        if tpl.protocol:  # the pipeline's loop as the scheduler protocol has it: L0 scaled, x = scale(L, t)
            L0 = call.sample() * sched.init_noise_sigma
            try:
                bound = inspect.signature(type(pipe).__call__).bind(pipe, *self.args, **self.kwargs)
            except TypeError as e:
                raise PargenError(f"{type(pipe).__name__}: {e}") from None
            bound.apply_defaults()
            step_kw = {k: v for k, v in bound.arguments.items()
                       if k in ("generator", "eta", "use_clipped_model_output") and k in params}
            out0, t0 = None, None
        else:
            args = dict(rec["step"])
            names = list(params)[1:4]  # model_output, timestep, sample
            mo0, t0, L0 = (args.pop(k) for k in names)
            args.update(args.pop(next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), ""), {}) or {})
            step_kw, out0 = args, rec["out"]
        ts_all = state["timesteps"]
        n = getattr(pipe, "_num_timesteps", None) if not tpl.protocol else None
        n = n if isinstance(n, int) and 0 < n <= len(ts_all) else None
        begin = state.get("_begin_index")  # img2img starts part-way; a scheduler without a begin index: the tail
        begin = begin if begin is not None else len(ts_all) - n if n is not None else 0
        ts = ts_all[begin:begin + n] if n is not None else ts_all[begin:]
        if t0 is not None and float(ts[0]) != float(torch.as_tensor(t0).reshape(-1)[0]):
            return "the loop's first timestep is not the scheduler's"
        if tpl.guide == "cfg":
            guidance = float(getattr(pipe, "guidance_scale", getattr(pipe, "_guidance_scale", 1.0)))
            guided = bool(getattr(pipe, "do_classifier_free_guidance", False))
            rescale = float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0)
        elif tpl.guide == "dit":
            bound = inspect.signature(type(pipe).__call__).bind(pipe, *self.args, **self.kwargs)
            bound.apply_defaults()
            guidance = float(bound.arguments.get("guidance_scale", 1.0))
            guided, rescale = guidance > 1, 0.0
        else:
            guidance, guided, rescale = 0.0, False, 0.0
        plan = _Plan(tpl, call.kwargs, call.first, L0, call.sample(), out0, ts, step_kw, {}, rec["rng"], guidance,
                     rescale, guided)
        if tpl.protocol:
            plan.x0 = par._input(plan, L0, ts[0])
            state = dict(sched.__dict__)  # scale_model_input may mark the scheduler
        else:
            x0 = par._input(plan, L0, ts[0])
            if x0.shape != call.sample().shape or not torch.equal(x0, call.sample()):
                return f"{type(pipe).__name__}'s denoiser input is not what its template makes of the latents"
            tk = next((k for k in ("timestep", "t") if k in call.kwargs), None)
            t_rec = call.kwargs.get(tk)
            t_mine = par._time(plan, ts[0], x0.shape[0])
            if t_rec is None or not torch.equal(torch.as_tensor(t_rec).to(t_mine.dtype).reshape(-1).expand(
                    t_mine.shape), t_mine):
                return f"{type(pipe).__name__}'s denoiser timestep is not what its template makes of the schedule"
            mo = par._guide(plan, out0)
            if not isinstance(mo0, Tensor) or mo.shape != mo0.shape or not torch.equal(mo, mo0):
                return f"{type(pipe).__name__}'s guidance is not what its template does"
            state = dict(sched.__dict__)
        plan.sched = copy.deepcopy(state)
        return plan


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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's own `__call__`, same arguments and output (with `.pargen`, the cost, attached)."""
        pipe = self.pipe
        tpl = TEMPLATES.get(type(pipe).__name__)
        sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
        if tpl is not None and tpl.copies == "dit" and sigma != 1:
            raise PargenError(f"DiTPipeline never scales its initial noise by init_noise_sigma, which "
                              f"{type(pipe.scheduler).__name__} needs ({sigma:g}); use a scheduler whose "
                              "init_noise_sigma is 1 (DDPM, DDIM, DPM-Solver, UniPC, DEIS, PNDM)")
        why = "pargen has no step template for this pipeline class" if tpl is None else \
            f"a {self.models[1][0]} runs beside the denoiser" if len(self.models) > 1 else \
            next((f"{k} changes the loop" for k in LOOP_EXTRAS if kwargs.get(k) is not None), None)
        t_start = time.perf_counter()
        with _Session(self, args, kwargs) as s:
            if why is None and (self.method == "picard" or tpl.protocol):
                plan = s.record(tpl)
                if isinstance(plan, str):
                    why = plan
                else:
                    out = self._drive(s, plan)
            if why is not None or not (self.method == "picard" or tpl.protocol):
                s.cost.why = why
                out = self._solve(s) if self.method == "picard" else s.replay(mode="real", final=True)
                if self.method == "sequential":
                    s.cost.path = "pipeline"
                    s.cost.calls = len(s.inputs)
        cost = s.cost
        cost.wall_s = time.perf_counter() - t_start
        self.cost = cost
        try:
            object.__setattr__(out, "pargen", cost)
        except (AttributeError, TypeError):
            pass
        return out

    # ---- driven rounds: the pipeline's preparation once, then only the denoiser and the scheduler's step

    def _drive(self, s: _Session, plan: _Plan) -> Any:
        """Window rounds on the plan: one batched denoiser call over the window, then the scheduler's own `step`
        through it from the frontier's saved state (later steps on the latest output, as guesses), the residual
        of every denoiser input, the window slid past the converged ones. Then the pipeline's own call once more,
        every denoiser call and step answered from the solution, for its own decoding and output."""
        sched, cost, n = self.pipe.scheduler, s.cost, len(plan.timesteps)
        w = self.window if self.method == "picard" else 1
        inputs: list[Tensor | None] = [plan.x0] + [None] * (n - 1)  # the denoiser's input per call
        outputs: dict[int, Any] = {} if plan.out0 is None else {0: plan.out0}
        steps: list[Any] = [None] * n  # each step's own return value (the pipeline's decoding reads the last)
        sched.__dict__.clear()
        sched.__dict__.update(plan.sched)
        s.rng.set(plan.rng)
        scale = self._noise_scales(plan.timesteps)
        with torch.no_grad(), _Clock(cost):
            self._rounds(s, plan, _Batcher(plan, self._time), inputs, outputs, steps, w, scale)
        cost.calls, cost.path = n, "driven"
        end, rng_end = dict(sched.__dict__), s.rng.get()
        out = s.replay(mode="answer", final=True, outputs=outputs, steps=steps)
        sched.__dict__.clear()
        sched.__dict__.update(end)
        s.rng.set(rng_end)
        return out

    def _rounds(self, s: _Session, plan: _Plan, batcher: "_Batcher", inputs: list, outputs: dict, steps: list,
                w: int, scale: list[float]) -> None:
        sched, cost, ts = self.pipe.scheduler, s.cost, plan.timesteps
        n, step, L, c = len(ts), type(sched).step, plan.latents, 0
        saved = None  # (scheduler state, random state, L) at the frontier when the scheduler has moved past it
        while c < n:
            if self.max_rounds is not None and cost.rounds >= self.max_rounds:
                raise PargenError(f"no convergence within {self.max_rounds} rounds (window {w}, tol {self.tol:g})")
            hi = 1 if c == 0 else min(n, c + w)  # the first window is call 0: the only input known exactly
            if not (c == 0 and outputs):
                m0 = time.perf_counter()
                outs = batcher(s.reals[0], inputs[c:hi], ts[c:hi])
                cost.model_s += time.perf_counter() - m0
                outputs.update(zip(range(c, hi), outs))
                cost.rounds += 1
                cost.evaluations += hi - c
            if saved is not None:
                sched.__dict__.clear()
                sched.__dict__.update(saved[0])
                s.rng.set(saved[1])
                L = saved[2]
            saved, frontier, stop, res, x = None, None, hi, 0.0, inputs[c]
            j = c
            while j < stop:  # the scheduler's own step through the window, then guesses up to the next one's end
                mo = self._guide(plan, outputs[min(j, hi - 1)])
                steps[j] = step(sched, mo, ts[j], x if plan.tpl.step_on_input else L, **plan.step_kw)
                L = steps[j][0] if isinstance(steps[j], tuple) else steps[j].prev_sample
                j += 1
                if j < n:
                    x = self._input(plan, L, ts[j])
                    if j < hi:
                        err = torch.linalg.vector_norm(x - inputs[j], dtype=torch.float64).item() / (
                            x.numel() ** 0.5 * scale[j])  # RMS
                        res = max(res, err)
                        if frontier is None and err > self.tol:
                            frontier = j
                    inputs[j] = x
                if frontier is None and j == hi:
                    frontier = hi
                if frontier == j and j < n:  # call j's input is exact: the next round starts here
                    stop = min(n, j + w - 1)
                    if stop > j:
                        saved = (_snapshot(sched.__dict__, plan.sched), s.rng.get(), L)
            cost.residuals.append(res)
            c = frontier if frontier is not None else n

    def _input(self, plan: _Plan, L: Tensor, t: Tensor) -> Tensor:
        tpl = plan.tpl
        x = L
        if plan.guided and tpl.copies == "cat":
            x = torch.cat([L, L])
        elif plan.guided and tpl.copies == "dit":
            half = L[: len(L) // 2]
            x = torch.cat([half, half])
        return self.pipe.scheduler.scale_model_input(x, t) if tpl.scale else x

    def _time(self, plan: _Plan, t: Tensor, rows: int) -> Tensor:
        if plan.tpl.time == "t":
            return t.reshape(1).expand(rows)
        v = t.reshape(-1)[:1].expand(rows)
        return v.to(plan.latents.dtype) / 1000 if plan.tpl.time == "rows/1000" else v

    def _guide(self, plan: _Plan, out: Any) -> Tensor:
        o = out[0] if isinstance(out, tuple) else out.sample
        g = plan.guidance
        if plan.tpl.guide == "cfg" and plan.guided:
            u, c = o.chunk(2)
            o = u + g * (c - u)
            if plan.rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                o = rescale_noise_cfg(o, c, guidance_rescale=plan.rescale)
        elif plan.tpl.guide == "dit":
            lc = plan.latents.shape[1]
            if plan.guided:
                eps, rest = o[:, :lc], o[:, lc:]
                cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
                half = uncond + g * (cond - uncond)
                o = torch.cat([torch.cat([half, half]), rest], dim=1)
            if self.denoiser.config.out_channels // 2 == lc:
                o = o[:, :lc]
        return o

    def _noise_scales(self, ts: Tensor) -> list[float]:
        """Per call, what `tol` is relative to: 1 (an absolute RMS change of the denoiser's input), or with
        tol_scale="noise" the noise std the scheduler adds at that call's timestep (ParaDiGMS' and diffusers'
        StableDiffusionParadigmsPipeline's convention: for DDIM the variance its step adds at eta 1, from the
        timestep one stride back; DDPM- and DDIM-family schedulers only)."""
        if self.tol_scale == "none":
            return [1.0] * len(ts)
        sched = self.pipe.scheduler
        var = getattr(sched, "_get_variance", None)
        if var is None or getattr(sched, "num_inference_steps", None) is None:
            raise PargenError(f"tol_scale='noise' needs a DDPM- or DDIM-family scheduler (one noise variance per "
                              f"timestep); {type(sched).__name__} has none")
        params = inspect.signature(var).parameters
        stride = sched.config.num_train_timesteps // sched.num_inference_steps
        return [max(float(var(int(t), int(t) - stride) if "prev_timestep" in params else var(int(t))), 1e-20) ** 0.5
                for t in ts.reshape(-1)]

    # ---- replayed rounds: the pipeline's whole call per round (any pipeline, callbacks, ControlNets)

    def _solve(self, s: _Session) -> Any:
        cost, inputs, outputs = s.cost, s.inputs, s.outputs
        cost.path = "replay"
        s.replay(mode="first")
        n = len(inputs)
        cost.calls = n
        if n == 0:
            raise PargenError(f"{type(self.pipe).__name__} never called its {self.denoiser_name}; nothing to solve")
        with _Clock(cost):
            self._windows(s)
        return s.replay(mode="window", final=True)

    def _windows(self, s: _Session) -> None:
        cost, inputs, outputs, n = s.cost, s.inputs, s.outputs, len(s.inputs)
        span = self.window * len(self.models)  # a window of w steps: w calls of each solved model
        c = 1  # calls < c are final; call c's recorded input is exact (it follows from final calls only)
        scale = self._noise_scales(torch.stack([torch.as_tensor(_timestep(call)) for call in inputs])) \
            if self.tol_scale != "none" else [1.0] * n
        while c < n:
            if self.max_rounds is not None and cost.rounds >= self.max_rounds:
                raise PargenError(f"no convergence within {self.max_rounds} rounds (window {self.window}, tol "
                                  f"{self.tol:g})")
            hi = min(n, c + span)
            for m, real in enumerate(s.reals):  # one batched call per model, all at the recorded inputs
                idx = [i for i in range(c, hi) if inputs[i].model == m]
                if idx:
                    batch = [inputs[i] for i in idx]
                    m0 = time.perf_counter()
                    out = real(**_batch(batch))
                    cost.model_s += time.perf_counter() - m0
                    for i, o in zip(idx, _split(out, [x.sample().shape[0] for x in batch])):
                        outputs[i] = o
                    s.latest[m] = idx[-1]
            cost.rounds += 1
            cost.evaluations += hi - c
            old = inputs[c:hi]
            s.replay(mode="window", stop=hi + span)  # the next window starts at or before hi
            errs = [_moved(inputs[i], o) / sc for i, o, sc in zip(range(c, hi), old, scale[c:hi])]
            cost.residuals.append(max(errs, default=0.0))
            step = 1  # call c was evaluated at its true input: final
            while c + step < hi and errs[step] <= self.tol:
                step += 1
            c += step


def _snapshot(state: dict, base: dict) -> dict:
    """A copy of a scheduler's state that later steps cannot reach, cheaply: what is still the base state's own
    object and not a container (the schedule's tensors, the config) shared, the rest (step index, multistep
    histories, a solver's last sample) deep-copied."""
    return {k: v if base.get(k) is v and type(v) not in (list, dict, set) else copy.deepcopy(v)
            for k, v in state.items()}


class _Clock:
    """Times a round loop into the cost: loop_s, and overhead_s, the seconds per round outside model calls."""

    def __init__(self, cost: Cost):
        self.cost = cost

    def __enter__(self):
        self.t0, self.m0, self.r0 = time.perf_counter(), self.cost.model_s, self.cost.rounds

    def __exit__(self, *exc) -> None:
        c = self.cost
        c.loop_s = time.perf_counter() - self.t0
        c.overhead_s = max(c.loop_s - (c.model_s - self.m0), 0.0) / max(c.rounds - self.r0, 1)


def _timestep(call: _Call) -> Tensor:
    t = call.kwargs.get("timestep", call.kwargs.get("t"))
    return torch.as_tensor(t).reshape(-1)[0]


class _Batcher:
    """One denoiser call over a window: the inputs and their timesteps concatenated, the conditioning of call 0
    repeated once per call (built once per window width)."""

    def __init__(self, plan: _Plan, time_fn: Callable):
        self.plan, self.time_fn, self.shared = plan, time_fn, {}
        self.rows = plan.x0.shape[0]

    def _repeat(self, v: Any, w: int) -> Any:
        if isinstance(v, dict):
            return {k: self._repeat(u, w) for k, u in v.items()}
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == self.rows:
            return torch.cat([v] * w)
        return v

    def __call__(self, forward: Callable, xs: list[Tensor], ts: Tensor) -> list[Any]:
        w, p = len(xs), self.plan
        if w not in self.shared:
            self.shared[w] = {k: self._repeat(v, w) for k, v in p.kwargs.items() if k not in (p.first, "timestep")}
        t = torch.cat([self.time_fn(p, ts[i], self.rows) for i in range(w)]) if w > 1 else \
            self.time_fn(p, ts[0], self.rows)
        out = forward(**self.shared[w], **{p.first: torch.cat(xs) if w > 1 else xs[0], "timestep": t})
        return _split(out, [self.rows] * w)
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
    scheduler's noise std at that step, as ParaDiGMS (DDPM-family schedulers).

    Pipelines pargen has a step template for (DDPM, DDIM, Stable Diffusion 1/2, img2img, SDXL, SD3, FLUX, DiT)
    are driven: prepared once by their own call, then each round is one batched denoiser call and the scheduler's
    own `step`; any other pipeline, a ControlNet, or a `callback_on_step_end` (it may edit the latents, so it is
    part of the system solved, and its side effects happen in every replay) runs the pipeline's whole loop per
    round. `cost.path` says which ran and `cost.why` why a pipeline was replayed."""
    return Parallel(pipe, method, window, tol, max_rounds, tol_scale)
