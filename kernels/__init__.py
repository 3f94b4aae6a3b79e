"""Triton GPU kernels of hyperlane_lab (installed as the package ``hyperlane_lab.kernels``).

Every module here imports ``triton`` lazily inside its launcher functions, so importing this
package is cheap and works on machines without Triton or without a GPU.
"""
