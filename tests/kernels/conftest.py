"""Kernel tests: without a GPU the Triton gating kernels run under the Triton interpreter.

Triton fixes interpreter mode when it is first imported, so ``TRITON_INTERPRET=1`` is set here,
before anything in this directory imports triton, unless a GPU is present (then the GPU tests run
compiled kernels) or triton was already imported by an earlier test module. In those two cases
``test_gating_triton_interpreter.py`` skips itself and ``test_gating_triton_subprocess.py`` runs it
in a fresh interpreter-mode process instead.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
