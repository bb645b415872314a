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

# Compile it: the same function, parameters in G-space (path values); any optimizer trains it.
cm = ic.compile_invariant(model, x, form="gspace")
print("free parameters:", cm.num_free_parameters(), "of", report.num_params)
# Adam on path values is the thesis's G-Adam (SGD on them is G-SGD; path values of a deep model are
# small products, so G-SGD wants a smaller learning rate than plain SGD: see the README).
opt = torch.optim.Adam(cm.parameters(), lr=1e-3)
target = torch.randint(0, 10, (4,))
for step in range(5):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(cm(x), target)
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
model.load_state_dict(cm.export_state_dict())             # plain weights back in the original class
