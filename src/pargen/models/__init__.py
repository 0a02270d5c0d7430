"""Model families; importing this package registers them."""
from . import tarflow  # noqa: F401
