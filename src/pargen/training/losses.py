"""Training objectives: functions (model, x, y, rng) -> scalar loss. All randomness comes from the per-sample `rng`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.c2f import C2F
from ..models.classifier import Classifier
from ..models.denoiser import Denoiser
from ..models.raster_ar import RasterAR
from ..models.tarflow import TarFlow
from ..models.var import VAR
from ..tokenizers.codebook import restart_dead_codes
from ..tokenizers.msvq import MSVQVAE
from ..tokenizers.vq import VQVAE
from ..rng import SampleRNG


def drop_labels(y: Tensor | None, p: float, rng: SampleRNG) -> Tensor | None:
    """Replace labels by -1 (unconditional) with probability p, for classifier-free guidance."""
    if y is None or p <= 0:
        return y
    drop = rng.rand().to(y.device) < p
    return torch.where(drop, torch.full_like(y, -1), y)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def tarflow_loss(model: TarFlow, x: Tensor, y: Tensor | None, rng: SampleRNG, label_drop: float = 0.1) -> Tensor:
    """NLL with Gaussian noise augmentation (ml-tarflow's generation setting) and label drop for guidance."""
    cfg = unwrap(model).config
    x = x + cfg.noise_std * rng.randn(*x.shape[1:], dtype=x.dtype).to(x.device)
    y = drop_labels(y, label_drop, rng) if cfg.num_classes else None
    out = model(x, y)  # through DDP's forward when wrapped, so gradients are all-reduced
    return unwrap(model).nll(out.z, out.logdet)


def random_shift(x: Tensor, rng: SampleRNG, max_shift: int = 2) -> Tensor:
    """Translate each image by up to max_shift pixels (pad with the background value -1)."""
    B, _, H, W = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx, dy = rng.randint(2 * p + 1, 2).to(x.device).unbind(1)
    rows = (dy[:, None] + torch.arange(H, device=x.device)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(W, device=x.device)[None])  # (B, W)
    return xp[torch.arange(B)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


def classifier_loss(model: Classifier, x: Tensor, y: Tensor, rng: SampleRNG) -> Tensor:
    return F.cross_entropy(model(random_shift(x, rng)), y)


def denoiser_loss(model: Denoiser, x: Tensor, y: Tensor | None, rng: SampleRNG, label_drop: float = 0.1) -> Tensor:
    """Epsilon-prediction loss (Ho et al.) at a uniformly drawn timestep, with label drop for guidance; a model
    whose config says `prediction="v_prediction"` regresses v = sqrt(ab) eps - sqrt(1 - ab) x0 instead (Salimans
    & Ho), which does not need a near-identity map at high noise."""
    net = unwrap(model)
    t = rng.randint(net.config.train_steps).view(-1).to(x.device)
    eps = rng.randn(*x.shape[1:], dtype=x.dtype).to(x.device)
    ab = net.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
    y = drop_labels(y, label_drop, rng) if net.config.num_classes else None
    target = eps if getattr(net.config, "prediction", "epsilon") == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x
    return F.mse_loss(model(ab.sqrt() * x + (1 - ab).sqrt() * eps, t, y), target)


def vq_loss(model: MSVQVAE | VQVAE, x: Tensor, y: Tensor | None, rng: SampleRNG, restart: bool = True) -> Tensor:
    """Reconstruction MSE + the VQ loss (commitment-weighted, straight-through; over all scales for the
    multi-scale tokenizer), with dead-code restart onto latents of the batch chosen by the per-sample streams."""
    out = model(x)
    net = unwrap(model)
    if restart and net.training:
        pool = out.f.detach().permute(0, 2, 3, 1).reshape(-1, out.f.shape[1])
        per = out.f.shape[2] * out.f.shape[3]
        V = net.config.vocab_size
        draws = rng.randint(per, -(-V // len(rng))).to(x.device)  # (B, ceil(V / B)): positions per sample
        rows = (torch.arange(len(rng), device=x.device)[:, None] * per + draws).T.reshape(-1)
        q = net.quantize
        restart_dead_codes(q.embedding, q.ema_vocab_hit_SV, out.hits.detach().clone(), pool, rows)
    return F.mse_loss(out.rec, x) + out.vq_loss


def var_loss(model: VAR, x: Tensor, y: Tensor | None, rng: SampleRNG, tokenizer: MSVQVAE,
             label_drop: float = 0.1) -> Tensor:
    """Next-scale cross-entropy over all scales, teacher-forced with the frozen tokenizer's tokens; labels are
    dropped to the null class with probability `label_drop` from the per-sample streams."""
    net = unwrap(model)
    with torch.no_grad():
        idx = tokenizer.img_to_indices(x)
        inputs = tokenizer.quantize.teacher_forcing_input(idx)
    y = torch.zeros(len(x), dtype=torch.long, device=x.device) if y is None else y
    y = drop_labels(y, label_drop, rng)
    logits = model(torch.where(y < 0, net.config.num_classes, y), inputs, cond_drop=0.0)
    return net.loss(logits, torch.cat(idx, 1))


def raster_loss(model: RasterAR, x: Tensor, y: Tensor | None, rng: SampleRNG, tokenizer: VQVAE,
                label_drop: float = 0.1) -> Tensor:
    """Next-token cross-entropy in raster order on the frozen tokenizer's tokens, labels dropped to the null
    class with probability `label_drop` from the per-sample streams."""
    with torch.no_grad():
        tokens = tokenizer.img_to_indices(x)
    y = torch.zeros(len(x), dtype=torch.long, device=x.device) if y is None else y
    logits = model(drop_labels(y, label_drop, rng), tokens)
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def c2f_loss(model: C2F, x: Tensor, y: Tensor | None, rng: SampleRNG, tokenizer: VQVAE,
             label_drop: float = 0.1) -> Tensor:
    """CTF: stage-1 next-coarse-label CE + stage-2 fine-label CE, both teacher-forced on the frozen tokenizer's
    tokens from the same batch (separate parameters: the sum trains both), labels dropped for guidance."""
    with torch.no_grad():
        tokens = tokenizer.img_to_indices(x)
    y = torch.zeros(len(x), dtype=torch.long, device=x.device) if y is None else y
    l1, l2 = model(drop_labels(y, label_drop, rng), tokens)
    return l1 + l2


LOSSES = {"tarflow": tarflow_loss, "classifier": classifier_loss, "denoiser": denoiser_loss, "unet": denoiser_loss,
          "msvq": vq_loss,
          "vq": vq_loss, "var": var_loss, "raster": raster_loss,
          "c2f": c2f_loss}
