"""Make docs/var_inpainting.png: zero-shot in-painting with the bundled MNIST VAR (run from the repo root).

Rows: MNIST test digits, the kept region (centre removed), VAR's in-painting with the true label, and
class-conditional editing (the centre re-generated under label (y + 1) mod 10)."""
import torch

from pargen import checkpoint, data, images
from pargen.samplers import autoregressive as AR

var, _ = checkpoint.load(checkpoint.resolve("var-mnist"))
vae, _ = checkpoint.load(checkpoint.resolve("msvq-mnist"))
test = data.load("mnist", "test", 32)
x, y = test.float(slice(0, 10)), test.labels[:10]
keep = torch.ones(10, 1, 32, 32)
keep[..., 8:24, 8:24] = 0
region = AR.known_region(vae.eval(), x, keep)
rows = [x, torch.where(keep.bool(), x, torch.full_like(x, -0.3))]
for labels in (y, (y + 1) % 10):
    out = [AR.sample(var.eval(), vae, labels[i:i + 1], cfg=1.5,
                     known=AR.Known([t[i:i + 1] for t in region.indices], [m[i:i + 1] for m in region.mask]),
                     generator=torch.Generator().manual_seed(i)).img * 2 - 1 for i in range(10)]
    rows.append(torch.cat(out))
images.save_grid(torch.cat(rows), "docs/var_inpainting.png", nrow=10, scale=2)
print("docs/var_inpainting.png")
