"""DLSN: Deep Learnable Similarity Network for single-image super-resolution.

``dlsn.models`` holds the networks (GLA block, DLSN, presets, checkpoints), ``dlsn.training`` and
``dlsn.evaluation`` the libraries behind the entry points ``python -m dlsn.train`` and
``python -m dlsn.eval``; ``python -m dlsn.upscale`` upscales images. The attention kernels live in
the separate package ``dlsn_kernels``.
"""
