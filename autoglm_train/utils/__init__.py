"""Small helpers with no dependencies inside the package, so any layer (``data/`` included) may use them."""
