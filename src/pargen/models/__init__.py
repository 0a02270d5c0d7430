"""Model families; importing this package registers them."""
from . import classifier, denoiser, tarflow, var  # noqa: F401
