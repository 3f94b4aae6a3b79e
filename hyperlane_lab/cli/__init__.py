"""Command-line interface (``hyperlane``): thin wrappers over library functions."""
