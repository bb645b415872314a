"""The ten lines a user copies: find the rescaling group of your model and check it numerically."""
import torch
import torch.nn as nn

import invariance_compiler as ic
from invariance_compiler.analyze import oracle

model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, 10))
x = torch.randn(4, 3, 16, 16)

report = ic.analyze(model, x)                     # the model is left untouched
print(report)                                     # per-layer table: rescale / normalize / inert
E = report.generator_matrix()                     # (m, H), rows in model.parameters() order

# Any group element exp(E λ) leaves the function unchanged (float64 check, negligible BN eps):
print("relative output change under a random group element:",
      oracle.invariance_error(model, report, (x,)))
