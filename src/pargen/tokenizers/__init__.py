"""Image tokenizers; importing this package registers them."""
from . import msvq, vq  # noqa: F401
