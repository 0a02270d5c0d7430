"""Model families; importing this package registers them."""
from . import classifier, tarflow  # noqa: F401
