"""train.deterministic selects the kernels that make GPU reruns bit-identical (checked on the GPU by
tests/gpu/test_train_cuda.py's resume cases); here: the switches it sets, both ways."""

from __future__ import annotations

import torch

from scalesparse.train.engine import use_deterministic_kernels


def test_deterministic_mode_trains_with_math_attention_and_back():
    try:
        use_deterministic_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()  # its backward accumulates with atomics
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        use_deterministic_kernels(False)  # the next config in the same process gets the fast kernels back
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        use_deterministic_kernels(False)
