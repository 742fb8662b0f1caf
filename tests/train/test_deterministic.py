"""train.deterministic selects the kernels that make GPU reruns bit-identical (checked on the GPU by
tests/gpu/test_train_cuda.py's resume cases); here: the switches it sets, both ways."""

from __future__ import annotations

import torch

from scalesparse.train.engine import use_deterministic_kernels


def test_deterministic_mode_trains_with_math_attention_and_back():
    import warnings

    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # as the worker loop does
            use_deterministic_kernels(True)
            warnings.warn_explicit("scatter_add_cuda_kernel does not have a deterministic implementation, but you "
                                   "set 'torch.use_deterministic_algorithms(True, warn_only=True)'", UserWarning,
                                   "graph.py", 1, module="torch.autograd.graph")  # fmt: skip
        assert [str(w.message)[:22] for w in seen] == ["scatter_add_cuda_kerne"]  # not filtered away
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
