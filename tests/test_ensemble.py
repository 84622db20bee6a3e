from __future__ import annotations

import dask.array as da
import numpy as np
import torch
from torch import nn

from pipeline.config import EnsembleConfig
from pipeline.ensemble import EnsembleMLP, fit_ensemble, hidden_widths, predict_chunks


def paper_member(model: EnsembleMLP, member: int) -> nn.Sequential:
    """The paper's pixel_classifier with the weights of one ensemble member."""
    widths = (model.dim, *hidden_widths(model.num_classes), model.num_classes)
    layers = [nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.BatchNorm1d(widths[1]),
              nn.Linear(widths[1], widths[2]), nn.ReLU(), nn.BatchNorm1d(widths[2]), nn.Linear(widths[2], widths[3])]
    sequential = nn.Sequential(*layers)
    with torch.no_grad():
        for layer, linear in enumerate((0, 3, 6)):
            sequential[linear].weight.copy_(model.weights[layer][member].T)
            sequential[linear].bias.copy_(model.biases[layer][member, 0])
    return sequential


def test_stacked_members_equal_independent_paper_mlps():
    model = EnsembleMLP(members=3, dim=20, num_classes=5, seed=7)
    x = torch.randn(16, 20)
    logits = model(x)
    per_member = torch.randn(3, 16, 20)
    logits_own = model(per_member)
    for member in range(3):
        assert torch.allclose(paper_member(model, member)(x), logits[member], atol=1e-5)
        assert torch.allclose(paper_member(model, member)(per_member[member]), logits_own[member], atol=1e-5)


def test_members_are_seeded_seed_plus_index():
    a = EnsembleMLP(members=3, dim=8, num_classes=4, seed=10)
    b = EnsembleMLP(members=2, dim=8, num_classes=4, seed=11)
    assert torch.equal(a.weights[0][1], b.weights[0][0])  # member 1 of seed 10 is member 0 of seed 11
    assert not torch.equal(a.weights[0][0], a.weights[0][1])
    assert hidden_widths(29) == (128, 32) and hidden_widths(30) == (256, 128)


def toy(pixels=4096, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(pixels, dim)).astype(np.float16)
    y = ((x[:, 0] > 0).astype(np.uint8) + 2 * (x[:, 1] > 0)).astype(np.uint8)
    y[::17] = 255
    return da.from_array(x, chunks=(512, dim)), da.from_array(y, chunks=512)


def test_streaming_fit_learns_and_is_deterministic():
    x, y = toy()
    config = EnsembleConfig(members=3, epochs=3, buffer_chunks=2)
    model, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    assert history[-1].accuracy > 0.9 and history[-1].loss < history[0].loss
    assert history[0].pixels == int((y.compute() != 255).sum())  # ignore pixels dropped, each pixel once per epoch
    again, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    first_rows = [first for first, _, _ in predict_chunks(model, x, batch_pixels=300, device=torch.device("cpu"))]
    assert first_rows[:3] == [0, 300, 512]


def test_early_stopping_uses_patience():
    x, y = toy()
    config = EnsembleConfig(members=2, epochs=50, patience=1, min_delta=0.9, buffer_chunks=4)
    _, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    assert len(history) == 2  # the second epoch cannot improve by 90%, so it stops


def test_members_per_pass_matches_separately_seeded_fits():
    x, y = toy()
    grouped, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                                    config=EnsembleConfig(members=3, members_per_pass=2, epochs=2, seed=5))
    assert grouped.members == 3 and {s.first_member for s in history} == {0, 2}
    alone, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                            config=EnsembleConfig(members=1, epochs=2, seed=7))
    for layer in range(3):
        assert torch.equal(grouped.weights[layer][2], alone.weights[layer][0])
    probe = torch.randn(32, 12)
    assert torch.allclose(grouped(probe)[2], alone(probe)[0], atol=1e-5)  # BatchNorm statistics joined too
