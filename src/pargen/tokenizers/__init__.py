"""Image tokenizers; importing this package registers them."""
from . import msvq  # noqa: F401
