"""Model families; importing this package registers them."""
from . import classifier, denoiser, raster_ar, tarflow, var  # noqa: F401
