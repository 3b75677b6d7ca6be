"""DLSN: Deep Learnable Similarity Network for single-image super-resolution.

``dlsn.models`` holds the networks (GLA block, DLSN, presets, checkpoints); the entry points are
``python -m dlsn.train``, ``python -m dlsn.eval`` and ``python -m dlsn.upscale``. The attention
kernels live in the separate package ``dlsn_kernels``.
"""
