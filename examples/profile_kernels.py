"""Profile the kernels and a G-SGD training step (same as `python -m invariance_compiler profile`).

    python examples/profile_kernels.py [--side 4096] [--rounds 20] [--trace trace.json] [--out report.md]

On a CUDA GPU: Triton kernel times, achieved GB/s and % of peak HBM bandwidth, a ResNet-18-shaped
training step with GSGD against torch.optim.SGD(foreach=True), and torch.profiler's kernel table.
Without a GPU: the same for the PyTorch reference path on CPU, saying so."""
import sys

from invariance_compiler.tools.profile import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
