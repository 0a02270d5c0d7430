"""Model families; importing this package registers them."""
from . import c2f, classifier, denoiser, raster_ar, tarflow, unet, var  # noqa: F401
