import os

# The Triton interpreter is chosen when kernels are defined, so this must run before any kvmesh.kernels
# (or triton) import. `TRITON_INTERPRET=0 pytest tests/kernels` runs the same tests compiled on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: the CPU under the interpreter, else the GPU."""
    if INTERPRETED:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a GPU")
    return torch.device("cuda")
