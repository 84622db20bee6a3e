from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Autocast, EnsembleConfig, Stopping
from pipeline.ensemble.fit import fit_ensemble
from pipeline.ensemble.model import EnsembleMLP, hidden_widths
from pipeline.ensemble.pool import ShufflePool
from pipeline.ensemble.predict import predict_chunks


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


def test_each_layer_of_a_member_is_its_own_draw():
    """A member's layers come from one generator drawn in turn; re-seeding it per layer made each layer's
    weights a prefix of the layer before's (their correlation was exactly 1)."""
    model = EnsembleMLP(members=2, dim=40, num_classes=5, seed=3)
    first = model.weights[0][0].detach().T.flatten()  # drawn as [out, in], stored transposed
    second = model.weights[1][0].detach().T.flatten()
    assert not torch.equal(second, first[: second.numel()])
    assert abs(float(torch.corrcoef(torch.stack([second, first[: second.numel()]]))[0, 1])) < 0.2
    generator = torch.Generator().manual_seed(3)  # the paper's order: layer after layer from one stream
    torch.randn(128, 40, generator=generator)
    assert torch.equal(second, (torch.randn(32, 128, generator=generator) * 0.02).flatten())


def test_stacked_passes_record_the_seed_of_their_first_member():
    parts = [EnsembleMLP(2, 8, 4, seed=10), EnsembleMLP(2, 8, 4, seed=12)]
    joined = EnsembleMLP.stack(parts)
    assert joined.members == 4 and joined.seed == 10
    assert torch.equal(joined.weights[0][3], EnsembleMLP(4, 8, 4, seed=10).weights[0][3])


# The toy sets hold ~4k rows: the paper's batch and lr give them enough steps per epoch.
# One pass of all members (the default runs two passes at once), as these tests count epochs per pass.
SMALL = {"parallel_passes": 1, "batch_size": 64, "lr": 1e-3}


def toy(pixels=4096, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(pixels, dim)).astype(np.float16)
    y = ((x[:, 0] > 0).astype(np.uint8) + 2 * (x[:, 1] > 0)).astype(np.uint8)
    y[::17] = 255
    return da.from_array(x, chunks=(512, dim)), da.from_array(y, chunks=512)


def test_streaming_fit_learns_and_is_deterministic():
    x, y = toy()
    config = EnsembleConfig(**SMALL, members=3, epochs=3, buffer_rows=1024)  # streams through the pool
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
    config = EnsembleConfig(**SMALL, members=2, epochs=50, patience=1, min_delta=0.9, buffer_rows=2048)
    _, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    assert len(history) == 2  # the second epoch cannot improve by 90%, so it stops


def test_members_per_pass_matches_separately_seeded_fits():
    x, y = toy()
    grouped, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                                    config=EnsembleConfig(**SMALL, members=3, members_per_pass=2, epochs=2, seed=5))
    assert grouped.members == 3 and {s.first_member for s in history} == {0, 2}
    alone, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                            config=EnsembleConfig(**SMALL, members=1, epochs=2, seed=7))
    for layer in range(3):
        assert torch.equal(grouped.weights[layer][2], alone.weights[layer][0])
    probe = torch.randn(32, 12)
    assert torch.allclose(grouped(probe)[2], alone(probe)[0], atol=1e-5)  # BatchNorm statistics joined too


def numbered(pixels=3000, chunk=250, ignore_every=7):
    """Features whose first two columns spell the row number (exact in float16), labels with ignore rows."""
    ids = np.arange(pixels)
    x = np.stack([ids // 100, ids % 100, np.zeros(pixels)], axis=1).astype(np.float16)
    y = (ids % 3).astype(np.uint8)
    y[::ignore_every] = 255
    return da.from_array(x, chunks=(chunk, 3)), da.from_array(y, chunks=chunk), ids[y != 255]


def visited(pool, rng):
    rows = []
    for features, _, index in pool.epoch(rng):
        block = features[index].float()
        rows.append((block[:, 0] * 100 + block[:, 1]).long().numpy())
    return rows


def test_shuffle_pool_streams_every_labeled_row_once_within_its_capacity():
    x, y, labeled = numbered()
    pool = ShufflePool(x, y, capacity=800, ignore_label=255)
    assert not pool.resident and pool.size == 800 and pool.total == len(labeled)
    blocks = visited(pool, np.random.default_rng(0))
    assert np.array_equal(np.sort(np.concatenate(blocks)), labeled)  # each labeled row once, no ignore row
    # A group is ~200 rows (one chunk), yet the first evicted block mixes rows of many chunks.
    assert len(np.unique(blocks[0] // 250)) >= 4
    again = visited(pool, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(blocks, again))  # seeded
    other = visited(pool, np.random.default_rng(1))
    assert not np.array_equal(np.concatenate(blocks), np.concatenate(other))


def test_shuffle_pool_holds_a_split_that_fits_and_reads_it_once():
    x, y, labeled = numbered()
    pool = ShufflePool(x, y, capacity=10_000, ignore_label=255)
    assert pool.resident and pool.size == len(labeled)
    first = list(pool.epoch(np.random.default_rng(0)))
    second = list(pool.epoch(np.random.default_rng(1)))
    assert len(first) == len(second) == 1
    assert second[0][0] is first[0][0]  # the same tensor: no second read of the store
    assert np.array_equal(np.sort(visited(pool, np.random.default_rng(2))[0]), labeled)


def test_a_resident_pool_is_read_in_quarters_in_store_order(monkeypatch):
    """Reading a split that fits as one group held ~4x the pool at 256² (the group, its concatenation, the
    labeled copy, the dtype cast): it is read a quarter at a time, and holds the same rows in the same order."""
    import pipeline.ensemble.pool as pool_module

    x, y, labeled = numbered()
    reads = []
    real = pool_module._labeled_rows

    def counted(*args, **kwargs):
        features, targets = real(*args, **kwargs)
        reads.append(len(targets))
        return features, targets

    monkeypatch.setattr(pool_module, "_labeled_rows", counted)
    pool = ShufflePool(x, y, capacity=10_000, ignore_label=255)
    [(features, _, rows)] = list(pool.epoch(np.random.default_rng(0)))
    assert len(reads) >= 4 and max(reads) <= pool.size // 4 + 250  # a quarter, rounded up to whole chunks
    numbers = (features[rows, 0].float() * 100 + features[rows, 1].float()).long().numpy()
    assert np.array_equal(numbers, labeled)  # store order: as one read gave it


def test_a_streamed_pool_reads_random_groups_each_in_store_order(monkeypatch):
    """Groups are drawn at random (each epoch another draw), and each group's chunks are read in store order, so a
    native store's reader decodes an image's maps once for the chunks of that image in a group."""
    import pipeline.ensemble.pool as pool_module

    x, y, _ = numbered()
    groups = []
    real = pool_module._labeled_rows

    def recorded(matrix, labels, chunks, *args, **kwargs):
        groups.append(list(chunks))
        return real(matrix, labels, chunks, *args, **kwargs)

    monkeypatch.setattr(pool_module, "_labeled_rows", recorded)
    pool = ShufflePool(x, y, capacity=1_000, ignore_label=255)
    assert not pool.resident
    rng = np.random.default_rng(0)
    first = (list(pool.epoch(rng)), list(groups))
    groups.clear()
    list(pool.epoch(rng))
    for epoch in (first[1], groups):
        assert all(group == sorted(group) for group in epoch)
        assert sorted(sum(epoch, [])) == list(range(len(x.chunks[0])))  # every chunk once an epoch
    order = sum(first[1], [])
    assert order != sorted(order) and first[1] != groups  # random groups, drawn anew each epoch


def test_paper_rule_waits_for_warmup_then_stops_each_member():
    x, y = toy()
    never = EnsembleConfig(**SMALL, members=2, epochs=3, stopping=Stopping.PAPER, warmup_epochs=3, batch_patience=0)
    _, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=never, device=torch.device("cpu"))
    assert len(history) == 3 and history[-1].stopped == 0  # the rule only looks at epochs after warmup_epochs
    soon = EnsembleConfig(**SMALL, members=2, epochs=30, stopping=Stopping.PAPER, warmup_epochs=1, batch_patience=3)
    _, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=soon, device=torch.device("cpu"))
    assert len(history) == 2 and history[-1].stopped == 2
    assert history[-1].pixels < history[0].pixels  # both stopped within epoch 2, after a few batches


def test_stopped_member_keeps_the_weights_it_stopped_with():
    """In a pass of two, members stop at different batches; each must end as it would alone, although
    the pass (and Adam's momentum) goes on after its stop. Stacking changes last bits (~1e-8); ten more
    Adam steps at lr 1e-3 would change the weights by ~1e-3."""
    x, y = toy()
    common = dict(stopping=Stopping.PAPER, warmup_epochs=1, batch_patience=5, epochs=30, seed=3)
    pair, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                                 config=EnsembleConfig(**SMALL, members=2, **common))
    alone = [fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                          config=EnsembleConfig(**SMALL, members=1, **{**common, "seed": 3 + i})) for i in range(2)]
    stops = [(len(h), h[-1].pixels) for _, h in alone]
    assert stops[0] != stops[1] and max(stops) == (len(history), history[-1].pixels)  # one waits for the other
    for member, (model, _) in enumerate(alone):
        for name, value in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            mine = pair.state_dict()[name]
            if name.startswith("norms"):
                width = value.shape[0]
                mine = mine[member * width : (member + 1) * width]
            else:
                mine = mine[member : member + 1]
            assert torch.allclose(mine, value, rtol=0, atol=1e-6), name


def test_stopping_and_buffer_params_are_validated():
    from pipeline.config import ConfigError, params_from_dict

    assert params_from_dict({"ensemble": {"stopping": "paper", "epochs": 5}}).ensemble.stopping is Stopping.PAPER
    for bad, message in (({"stopping": "early"}, "ensemble.stopping='early' is not one of"),
                         ({"buffer_rows": 1}, "ensemble.buffer_rows must be >= 2"),
                         ({"batch_patience": -1}, "ensemble.batch_patience must be >= 0, got -1"),
                         ({"warmup_epochs": -1}, "ensemble.warmup_epochs must be >= 0"),
                         ({"buffer_chunks": 8}, "unknown params key(s) ensemble.buffer_chunks")):
        try:
            params_from_dict({"ensemble": bad})
        except ConfigError as error:
            assert message in str(error), str(error)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_parallel_passes_give_the_weights_of_passes_run_one_after_another():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((512, 12)).astype(np.float16)
    labels = rng.integers(0, 3, 512).astype(np.uint8)
    matrix, targets = da.from_array(features, chunks=(128, -1)), da.from_array(labels, chunks=128)
    base = EnsembleConfig(members=4, members_per_pass=2, epochs=2, batch_size=64, lr=1e-3, buffer_rows=1024)
    torch.set_num_threads(1)
    weights = {}
    for passes in (1, 2):
        model, history = fit_ensemble(matrix, targets, num_classes=3, ignore_label=255,
                                      config=base.model_copy(update={"parallel_passes": passes}), device=torch.device("cpu"))
        weights[passes] = model.state_dict()
        assert [stats.first_member for stats in history] == [0, 0, 2, 2]  # history in member order
    assert all(torch.equal(weights[1][key], weights[2][key]) for key in weights[1])
    # members_per_pass null splits the members evenly over the passes that run at once
    split, history = fit_ensemble(matrix, targets, num_classes=3, ignore_label=255, device=torch.device("cpu"),
                                  config=base.model_copy(update={"members_per_pass": None, "parallel_passes": 2}))
    assert split.members == 4 and {stats.first_member for stats in history} == {0, 2}
    assert all(torch.equal(split.state_dict()[key], weights[2][key]) for key in weights[2])


def test_prediction_is_the_same_whatever_the_number_of_chunks_predicted_at_once():
    from pipeline.ensemble.predict import vote

    rng = np.random.default_rng(4)
    matrix = da.from_array(rng.standard_normal((1000, 12)).astype(np.float16), chunks=(96, -1))
    model = EnsembleMLP(5, 12, 3, seed=1).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {workers: vote(model, matrix, batch_pixels=40, device=torch.device("cpu"), workers=workers)
                   for workers in (1, 2, 3)}
        rows = [first for first, _, _ in predict_chunks(model, matrix, batch_pixels=40, device=torch.device("cpu"),
                                                        workers=3)]
    finally:
        torch.set_num_threads(threads)
    assert rows == sorted(rows) and rows[:4] == [0, 40, 80, 96]  # in row order, batches restart at each chunk
    for workers in (2, 3):
        assert np.array_equal(results[workers][0], results[1][0])
        assert np.array_equal(results[workers][1], results[1][1])  # bit for bit, not approximately
    assert len(np.unique(results[1][0])) > 1


def test_bfloat16_autocast_trains_in_bf16_keeps_float32_weights_and_repeats_bit_for_bit():
    from pipeline.config import Autocast
    from pipeline.ensemble.predict import vote

    x, y = toy()
    config = EnsembleConfig(**{**SMALL, "parallel_passes": 2}, members=4, epochs=3, buffer_rows=1024,
                            autocast=Autocast.NONE)
    half = config.model_copy(update={"autocast": Autocast.BFLOAT16})
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=cpu)
        model, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=half, device=cpu)
        again, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=half, device=cpu)
        votes = {mode: vote(model, x, batch_pixels=300, device=cpu, workers=2, precision=mode)[0] for mode in Autocast
                 if mode is not Autocast.FLOAT16}
    finally:
        torch.set_num_threads(threads)
    assert history[-1].accuracy > 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts the products, not the weights
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    # the products really ran in bf16: the weights are not those of the float32 fit
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), full.parameters()))
    # bf16 prediction differs from float32 in a few borderline pixels at most
    agree = (votes[Autocast.BFLOAT16] == votes[Autocast.NONE]).mean()
    assert 0.98 < agree


def test_streamed_fit_gives_the_same_weights_whether_its_passes_share_one_pool_or_run_alone():
    """The pool streams (capacity below the labeled rows). Passes trained at once read one shared pool;
    each must see the items it sees alone, so the weights equal those of the passes one after another."""

    x, y = toy(pixels=2048)
    base = EnsembleConfig(**SMALL, members=4, epochs=2, buffer_rows=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fits = {(group, passes): fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                                              config=base.model_copy(update={"members_per_pass": group, "parallel_passes": passes}))
                for group, passes in ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2))}
    finally:
        torch.set_num_threads(threads)
    for group, passes in ((1, 2), (1, 3), (2, 2)):
        model, history = fits[(group, passes)]
        reference = fits[(group, 1)][0].state_dict()
        assert all(torch.equal(model.state_dict()[key], reference[key]) for key in reference), (group, passes)
        assert sorted({stats.first_member for stats in history}) == list(range(0, 4, group))
        assert {stats.pixels for stats in history} == {int((y.compute() != 255).sum())}  # every labeled row, every epoch
    # different members, different weights: the shared pool does not hand every pass the same model
    assert not torch.equal(fits[(1, 2)][0].weights[0][0], fits[(1, 2)][0].weights[0][1])


def test_a_pass_that_stops_early_does_not_hold_up_the_passes_sharing_its_pool():
    x, y = toy(pixels=2048)
    config = EnsembleConfig(**{**SMALL, "parallel_passes": 2}, members=2, members_per_pass=1, epochs=3,
                            buffer_rows=300, stopping=Stopping.PAPER, warmup_epochs=0, batch_patience=0)
    model, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    assert model.members == 2
    assert all(stats.stopped == 1 for stats in history if stats.epoch == 1)  # each stopped in its first epoch


def test_an_ensemble_file_round_trips_and_other_files_are_refused_by_name(tmp_path):
    import pytest

    from pipeline.config import params_from_dict
    from pipeline.ensemble.files import load_ensemble, save_ensemble
    from pipeline.errors import EnsembleError
    from pipeline.features.record import fit_record

    params = params_from_dict({"t_steps": [50, 150], "blocks": [1, 2]})
    record = fit_record(params, "ab")
    model = EnsembleMLP(2, 8, 3, seed=4)
    path = tmp_path / "ensemble.pt"
    save_ensemble(path, model, features=record)
    loaded = load_ensemble(path, fit_record(params, "ab"))
    assert (loaded.members, loaded.dim, loaded.num_classes, loaded.seed) == (2, 8, 3, 4) and not loaded.training
    for saved, again in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(saved, again)
    with pytest.raises(EnsembleError, match=r"blocks \[1, 2\] \(asked: \[1, 3\]\); rerun `dvc repro`"):
        load_ensemble(path, {**record, "blocks": [1, 3]})
    old = tmp_path / "old.pt"
    torch.save({**torch.load(path, weights_only=True), "format": "ddpm-segmentation-ensemble/1"}, old)
    with pytest.raises(EnsembleError, match=r"old.pt has format 'ddpm-segmentation-ensemble/1', not 'ddpm-segmentation-ensemble/2'"):
        load_ensemble(old, record)
    text = tmp_path / "notes.pt"
    text.write_text("not a torch file")
    with pytest.raises(EnsembleError, match=r"notes.pt cannot be read as an ensemble file"):
        load_ensemble(text, record)


@pytest.mark.parametrize("change, named", [
    ({"features": {"noise_seed": 1}}, "noise_seed 0 (asked: 1)"),
    ({"features": {"upsample": "nearest"}}, "upsample 'bilinear' (asked: 'nearest')"),
    ({"features": {"noise_draws": 3}}, "noise_draws 1 (asked: 3)"),
    ({"features": {"stochastic_noise": True}}, "stochastic_noise False (asked: True)"),
    ({"features": {"representation": "rgb"}}, "representation 'ddpm' (asked: 'rgb')"),
    ({"t_steps": [50, 250]}, "t_steps [50, 150] (asked: [50, 250])"),
])
def test_every_reader_refuses_an_ensemble_fit_on_other_features_naming_the_key(tmp_path, change, named):
    """segment, robustness and the API took an ensemble fit with another noise seed, upsample mode, noise
    draws or representation, and made wrong masks without a word; the file now carries the whole record."""
    from pipeline.config import params_from_dict
    from pipeline.ensemble.files import load_ensemble, save_ensemble
    from pipeline.errors import EnsembleError
    from pipeline.features.record import fit_record

    fitted = params_from_dict({"t_steps": [50, 150]})
    path = tmp_path / "ensemble.pt"
    save_ensemble(path, EnsembleMLP(2, 8, 3, seed=0), features=fit_record(fitted, "ab"))
    section = change.get("features")
    asked = params_from_dict({"t_steps": change.get("t_steps", [50, 150]), **({"features": section} if section else {})})
    with pytest.raises(EnsembleError, match="was fit on other features") as error:
        load_ensemble(path, fit_record(asked, "ab"))
    assert named in str(error.value)
    # the layout keeps the same values elsewhere: an ensemble fit on pixels stores reads native ones
    native = params_from_dict({"t_steps": [50, 150], "features": {"layout": "native"}})
    assert load_ensemble(path, fit_record(native, "ab")).members == 2


def test_plateau_stopping_is_decided_per_member_so_the_grouping_never_changes_the_weights():
    """Members stop at different epochs by their own epoch loss; fitted in one pass or one pass each,
    every member ends with the same weights (up to the last bits that stacking changes). On the old rule
    (the pass's mean loss) the pass stopped all its members together."""
    x, y = toy()
    base = EnsembleConfig(**SMALL, members=4, epochs=12, patience=1, min_delta=0.03, buffer_rows=1024, seed=2)
    together, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=base, device=torch.device("cpu"))
    alone, alone_history = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                                        config=base.model_copy(update={"members_per_pass": 1}))
    epochs = [max(s.epoch for s in alone_history if s.first_member == m) for m in range(4)]
    assert len(set(epochs)) > 1 and max(epochs) < 12, epochs  # the rule fired, at different epochs per member
    assert len(history) == max(epochs) and history[-1].stopped == 4
    reference = alone.state_dict()
    for name, value in together.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.allclose(value, reference[name], rtol=0, atol=1e-6), name


def test_prediction_counts_cores_where_the_os_has_no_cpu_affinity(monkeypatch):
    """macOS and Windows have no os.sched_getaffinity; evaluate, segment and robustness crashed there."""
    import os

    from pipeline.ensemble.predict import prediction_workers, vote

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert prediction_workers() == 3
        matrix = da.from_array(np.ones((64, 12), np.float16), chunks=(32, -1))
        prediction, _ = vote(EnsembleMLP(2, 12, 3, seed=0).eval(), matrix, batch_pixels=16, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert prediction.shape == (64,)


TODAYS_FIT = {"lr": 4e-3, "batch_size": 512, "epochs": 4, "stopping": Stopping.PLATEAU, "autocast": Autocast.BFLOAT16}


def test_recipe_fills_the_keys_left_null_and_an_explicit_key_wins():
    from pipeline.config import load_params, params_from_dict
    from tests.conftest import REPO

    def chosen(ensemble) -> dict:
        return {key: getattr(ensemble, key) for key in TODAYS_FIT}

    assert chosen(load_params(REPO / "params.yaml").ensemble) == TODAYS_FIT  # the default run fits as before
    assert chosen(params_from_dict({}).ensemble) == TODAYS_FIT
    paper = params_from_dict({"ensemble": {"recipe": "paper"}}).ensemble
    assert chosen(paper) == {"lr": 1e-3, "batch_size": 64, "epochs": 100, "stopping": Stopping.PAPER,
                             "autocast": Autocast.NONE}
    assert (paper.batch_patience, paper.warmup_epochs) == (50, 4)  # the paper's rule (train_interpreter.py)
    mixed = params_from_dict({"ensemble": {"recipe": "paper", "lr": 2e-3, "autocast": "bfloat16"}}).ensemble
    assert (mixed.lr, mixed.autocast, mixed.batch_size, mixed.epochs) == (2e-3, Autocast.BFLOAT16, 64, 100)
    assert params_from_dict({"ensemble": {"epochs": 9}}).ensemble.epochs == 9
    config = EnsembleConfig(**SMALL, members=2)  # made directly, as tests and benchmarks do: resolved by the fit
    assert config.autocast is None and config.resolved().autocast is Autocast.BFLOAT16
    assert config.resolved().resolved() == config.resolved()


def test_a_fit_left_to_the_fast_recipe_is_todays_fit():
    x, y = toy(pixels=1024)
    common = dict(members=1, buffer_rows=512, parallel_passes=1)
    recipe, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                             config=EnsembleConfig(**common))
    explicit, _ = fit_ensemble(x, y, num_classes=4, ignore_label=255, device=torch.device("cpu"),
                               config=EnsembleConfig(**common, **TODAYS_FIT))
    for p, q in zip(recipe.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("given", [{"stopping": "paper"}, {"recipe": "paper", "epochs": 4},
                                   {"recipe": "paper", "warmup_epochs": 100}, {"stopping": "paper", "epochs": 2}])
def test_a_paper_stopping_rule_that_cannot_fire_is_refused_naming_both_keys(given):
    from pipeline.config import ConfigError, params_from_dict

    with pytest.raises(ConfigError, match=r"ensemble.stopping=paper can never stop a member: ensemble.epochs=\d+.* <= "
                                          r"ensemble.warmup_epochs=\d+"):
        params_from_dict({"ensemble": given})


def test_a_paper_stopping_rule_that_can_fire_or_fixed_steps_are_accepted():
    from pipeline.config import params_from_dict

    for given in ({"recipe": "paper"}, {"stopping": "paper", "epochs": 5}, {"recipe": "paper", "epochs": 5},
                  {"stopping": "paper", "steps": 100}, {"stopping": "plateau", "epochs": 1}):
        params_from_dict({"ensemble": given})


@pytest.mark.parametrize("images", [1, 5])
@pytest.mark.parametrize("buffer_rows", [4096, 100])  # the whole split resident in the pool, or streamed through it
def test_steps_give_exactly_that_many_optimizer_steps_whatever_the_images(monkeypatch, images, buffer_rows):
    """1 image of 256 pixels gives 4 batches of 64 an epoch and 5 images 20: with steps = 30 both train 30 batches
    (the first cycling over 8 epochs), and no stopping rule ends them sooner."""
    taken = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (taken.append(1), step(self, *a, **k))[1])
    x, y = toy(pixels=256 * images)
    config = EnsembleConfig(**SMALL, members=2, steps=30, epochs=1, patience=1, min_delta=0.9, buffer_rows=buffer_rows)
    model, history = fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    assert len(taken) == 30  # one pass of 2 members: one optimizer, one step per batch
    assert sum(stats.pixels for stats in history) <= 30 * 64 and history[-1].stopped == 0
    if images == 1:
        assert len(history) > 1  # epochs cycled past epochs=1
    taken.clear()
    two_passes = EnsembleConfig(**{**SMALL, "parallel_passes": 2}, members=2, members_per_pass=1, steps=30,
                                buffer_rows=buffer_rows)
    fit_ensemble(x, y, num_classes=4, ignore_label=255, config=two_passes, device=torch.device("cpu"))
    assert len(taken) == 60  # 30 per pass, the passes sharing one pool


def test_the_pool_is_sized_in_memory_so_narrow_features_get_the_whole_split(monkeypatch):
    """The default pool is 1024 MiB of rows whatever D: 63,550 rows at the paper's D = 8448, 279,620 at D = 1920
    (the paper-like store's 131,072 train rows fit, read once); buffer_rows, when set, wins; the fit sizes its pool
    with the features' width and its rows' bytes."""
    default = EnsembleConfig()
    assert default.pool_rows(8448) == 63550 and default.pool_rows(1920) == 279620
    assert default.pool_rows(1920) * 1920 * 2 <= 1024 * 2**20 < (default.pool_rows(1920) + 1) * 1920 * 2
    assert EnsembleConfig(buffer_mb=1).pool_rows(1 << 20) == 2  # never below BatchNorm's two rows
    assert EnsembleConfig(buffer_rows=300, buffer_mb=1).pool_rows(12) == 300
    capacities = []
    original = ShufflePool.__init__

    def record(self, matrix, labels, capacity, *args, **kwargs):
        capacities.append(capacity)
        original(self, matrix, labels, capacity, *args, **kwargs)

    monkeypatch.setattr(ShufflePool, "__init__", record)
    x, y = toy(pixels=1024, dim=12)
    for config in (EnsembleConfig(**SMALL, members=1, epochs=1, buffer_mb=1),
                   EnsembleConfig(**SMALL, members=1, epochs=1, buffer_mb=1, autocast=Autocast.NONE),
                   EnsembleConfig(**SMALL, members=1, epochs=1, buffer_rows=100)):
        fit_ensemble(x, y, num_classes=4, ignore_label=255, config=config, device=torch.device("cpu"))
    assert capacities == [2**20 // 24, 2**20 // 24, 100]  # 12 values of 2 bytes a row, float16 or bfloat16 alike
    from pipeline.config import ConfigError, params_from_dict
    with pytest.raises(ConfigError, match="ensemble.buffer_mb"):
        params_from_dict({"ensemble": {"buffer_mb": 0}})
