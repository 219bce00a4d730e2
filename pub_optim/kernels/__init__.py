"""Optional Triton kernels of the core (loaded on use; the ``triton`` extra)."""
