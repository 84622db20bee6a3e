"""DatasetDDPM's distilled network: train_segnet (epoch chosen on val, resumable, from segnet.weights' encoder
weights), evaluate_segnet (the paper's IoU), segment --model segnet and the API, and the segnet params and
weights files refused at load."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.api import Segmenter, SegnetSegmenter
from pipeline.config import load_params, params_from_dict
from pipeline.data.layout import load_split, write_example
from pipeline.ensemble.metrics import label_counts, mean_iou_paper
from pipeline.errors import ConfigError, SegnetError
from pipeline.hashing import path_sha256
from pipeline.segnet.network import (
    build_network,
    load_segnet,
    read_segnet,
    segformer_config,
    segment_images,
    segnet_record,
)
from pipeline.segnet.train import EpochRecord, LabeledFolder, choose_epoch, train_segnet
from pipeline.segnet.weights import load_encoder_weights
from stages import evaluate_segnet as evaluate_stage
from stages import segment as segment_stage
from stages import train_segnet as train_stage
from tests.helpers import write_params

SIZE = 32
# a two-stage SegFormer of ~10k parameters: a few epochs of six images take well under a second
TINY_SEGNET = {"segnet.hidden_sizes": [8, 16], "segnet.depths": [1, 1], "segnet.attention_heads": [1, 2],
               "segnet.sr_ratios": [2, 1], "segnet.patch_sizes": [3, 3], "segnet.strides": [2, 2],
               "segnet.decoder_hidden_size": 16, "segnet.batch_size": 4, "segnet.epochs": 4,
               "segnet.steps": None}


def square_example(rng: np.random.Generator, channel: int = 0, ignore: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A dark canvas with one bright square; its class (1-3) is the square's colour channel + 1."""
    image = rng.integers(0, 40, (SIZE, SIZE, 3)).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    top, left, side = *rng.integers(2, 16, 2), int(rng.integers(6, 14))
    image[top : top + side, left : left + side, channel] = 230
    mask[top : top + side, left : left + side] = channel + 1
    if ignore:
        mask[:2] = 255  # a band the paper's protocol counts in unions, the strict one drops
    return image, mask


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("segnet")
    params = write_params(root / "params.yaml", TINY_SEGNET)
    rng = np.random.default_rng(0)
    for folder, count, ignore in ((root / "synthetic", 6, False), (root / "prepared" / "real" / "val", 3, True),
                                  (root / "prepared" / "real" / "test", 3, True)):
        for index in range(count):
            write_example(folder, f"{folder.name}_{index}", *square_example(rng, index % 3, ignore))
    return root, params


def run(monkeypatch, main, *argv):
    monkeypatch.setenv("DDPM_SEG_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["stage", *map(str, argv)])
    main()


def train_args(root, params, out):
    return ("--params", params, "--synthetic", root / "synthetic", "--data", root / "prepared",
            "--out", out / "segnet.pt", "--curves", out / "curves")


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory):
    """One unbroken train_segnet run: (its output folder, stdout)."""
    root, params = project
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run(monkeypatch, train_stage.main, *train_args(root, params, out))
    return out


def test_choose_epoch_takes_the_best_val_the_earliest_of_ties_and_the_last_without_val():
    history = [EpochRecord(1, 2.0, 0.2), EpochRecord(2, 1.0, 0.5), EpochRecord(3, 0.5, 0.5), EpochRecord(4, 0.4, 0.3)]
    assert choose_epoch(history) == 2
    assert choose_epoch([EpochRecord(1, 2.0, None), EpochRecord(2, 1.0, None)]) == 2


def test_the_epoch_kept_is_the_one_val_prefers_not_the_last(project):
    root, params = project
    config = load_params(params).segnet
    scores, snapshots = iter([0.2, 0.6, 0.4, 0.3]), []

    def validate(network):  # what val says after each epoch; the weights it saw
        snapshots.append({key: value.clone() for key, value in network.state_dict().items()})
        return next(scores)

    network = build_network(segformer_config(config, 11), seed=config.seed)
    result = train_segnet(network, LabeledFolder(root / "synthetic", SIZE), config, ignore_label=255, validate=validate,
                          device=torch.device("cpu"))
    assert result.epoch == 2 and [record.val_miou for record in result.history] == [0.2, 0.6, 0.4, 0.3]
    assert all(torch.equal(result.state_dict[key], snapshots[1][key]) for key in snapshots[1])
    assert not all(torch.equal(result.state_dict[key], snapshots[-1][key]) for key in snapshots[-1])


def test_segnet_steps_sets_the_epochs_by_the_synthetic_sets_size(project):
    """segnet.steps: the fewest whole epochs that make the steps, whatever the set's size (a size sweep keeps the
    optimizer steps); null: segnet.epochs."""
    assert params_from_dict({"segnet": {"epochs": 7, "steps": None}}).segnet.epochs_for(1000) == 7
    config = params_from_dict({"segnet": {"steps": 580, "batch_size": 8, "epochs": 7}}).segnet
    assert [config.epochs_for(n) for n in (29, 116, 231, 8, 1)] == [145, 39, 20, 580, 580]  # 4, 15, 29, 1, 1 batches
    root, params = project
    train = LabeledFolder(root / "synthetic", SIZE)
    config = load_params(params).segnet.model_copy(update={"steps": 5})
    batches = -(-len(train) // config.batch_size)
    network = build_network(segformer_config(config, 11), seed=config.seed)
    result = train_segnet(network, train, config, ignore_label=255, validate=None, device=torch.device("cpu"))
    assert len(result.history) == -(-5 // batches) != config.epochs


def test_many_short_epochs_are_scored_on_val_at_most_max_checks_times_and_the_last_always(project):
    """segnet.steps on a small set makes hundreds of tiny epochs: val runs every ceil(epochs / 100)-th epoch and after
    the last, and the epoch kept is one val scored."""
    from pipeline.segnet.train import MAX_CHECKS

    root, params = project
    train = LabeledFolder(root / "synthetic", SIZE)
    batches = -(-len(train) // 4)
    config = load_params(params).segnet.model_copy(update={"steps": batches * 250, "batch_size": 4})
    calls = iter(range(1000))
    network = build_network(segformer_config(config, 11), seed=config.seed)
    result = train_segnet(network, train, config, ignore_label=255, validate=lambda network: (next(calls) % 7) / 10,
                          device=torch.device("cpu"))
    scored = [record.epoch for record in result.history if record.val_miou is not None]
    assert len(result.history) == 250 and len(scored) <= MAX_CHECKS
    assert scored == [epoch for epoch in range(1, 251) if epoch % 3 == 0] + [250]
    assert result.epoch in scored and result.history[result.epoch - 1].val_miou == 0.6


def test_the_stage_scores_every_epoch_on_val_and_saves_the_best(project, trained):
    root, params = project
    loaded = load_params(params)
    network, training = load_segnet(trained / "segnet.pt", segnet_record(loaded.segnet, num_classes=11,
                                                                          image_size=SIZE, ignore_label=255))
    history = [EpochRecord(**record) for record in training["history"]]
    assert len(history) == 4 and training["epoch"] == choose_epoch(history) and training["chosen_on"] == "val"
    # the saved network's paper mIoU on the val split is what was recorded for the chosen epoch
    _, images, masks = load_split(root / "prepared", "val")
    prediction, _ = segment_images(network, images)
    assert round(mean_iou_paper(label_counts(masks, prediction, 11), 255), 6) == training["val_miou"]
    curves = (trained / "curves" / "plots" / "metrics" / "val_miou.tsv").read_text().split()
    assert curves[:2] == ["step", "val_miou"] and len(curves) == 2 + 2 * 4
    assert not (trained / "segnet.pt.state").exists()  # the state goes once the network is written
    assert "init" not in training  # a random init (segnet.weights: models/scratch) adds nothing to the default file


def test_train_segnet_reads_no_test_image_and_without_val_keeps_the_last_epoch(project, tmp_path, monkeypatch, capsys):
    root, params = project
    val_only = tmp_path / "val_only"  # the val split and nothing else: no test image can be chosen on
    (val_only / "real").mkdir(parents=True)
    (val_only / "real" / "val").symlink_to(root / "prepared" / "real" / "val")
    run(monkeypatch, train_stage.main, *train_args(root, params, tmp_path / "a")[:4], "--data", val_only,
        "--out", tmp_path / "a" / "segnet.pt", "--curves", tmp_path / "a" / "curves")
    assert read_segnet(tmp_path / "a" / "segnet.pt")["training"]["chosen_on"] == "val"
    no_val = tmp_path / "no_val"
    (no_val / "real").mkdir(parents=True)
    (no_val / "real" / "test").symlink_to(root / "prepared" / "real" / "test")
    run(monkeypatch, train_stage.main, *train_args(root, params, tmp_path / "b")[:4], "--data", no_val,
        "--out", tmp_path / "b" / "segnet.pt", "--curves", tmp_path / "b" / "curves")
    training = read_segnet(tmp_path / "b" / "segnet.pt")["training"]
    assert training["epoch"] == 4 and training["chosen_on"] == "last epoch" and training["val_miou"] is None
    assert "no val images, so no epoch can be chosen: the last one is kept" in capsys.readouterr().out


def test_a_killed_train_segnet_resumes_after_its_last_epoch_and_ends_as_an_unbroken_run(project, trained, tmp_path,
                                                                                     monkeypatch, capsys):
    root, params = project
    real_train = train_stage.train_segnet

    def killed_after_two_epochs(*args, on_epoch, **kwargs):
        def on_epoch_then_kill(record):
            on_epoch(record)
            if record.epoch == 2:
                raise KeyboardInterrupt  # as a kill between epochs 2 and 3
        return real_train(*args, on_epoch=on_epoch_then_kill, **kwargs)

    monkeypatch.setattr(train_stage, "train_segnet", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        run(monkeypatch, train_stage.main, *train_args(root, params, tmp_path))
    assert (tmp_path / "segnet.pt.state").is_file() and not (tmp_path / "segnet.pt").exists()
    monkeypatch.setattr(train_stage, "train_segnet", real_train)
    capsys.readouterr()
    run(monkeypatch, train_stage.main, *train_args(root, params, tmp_path))
    assert "resuming after epoch 2" in capsys.readouterr().out
    resumed, unbroken = read_segnet(tmp_path / "segnet.pt"), read_segnet(trained / "segnet.pt")
    assert resumed["training"] == unbroken["training"]
    assert all(torch.equal(resumed["state_dict"][key], value) for key, value in unbroken["state_dict"].items())
    assert (tmp_path / "curves" / "plots" / "metrics" / "loss.tsv").read_text() == \
        (trained / "curves" / "plots" / "metrics" / "loss.tsv").read_text()


def test_evaluate_segnet_scores_test_by_the_papers_protocol(project, trained, tmp_path, monkeypatch):
    root, params = project
    splits = {split: load_split(root / "prepared", split)[1:] for split in ("val", "test")}

    def truth_but_ignore_as_class_1(network, images, **kwargs):  # a known prediction, to score by hand
        masks = next(masks for split_images, masks in splits.values() if np.array_equal(split_images, images))
        prediction = np.where(masks == 255, 1, masks).astype(np.uint8)
        return prediction, np.zeros(prediction.shape, np.float32)

    monkeypatch.setattr(evaluate_stage, "segment_images", truth_but_ignore_as_class_1)
    run(monkeypatch, evaluate_stage.main, "--params", params, "--segnet", trained / "segnet.pt", "--data",
        root / "prepared", "--metrics", tmp_path / "datasetddpm.json")
    metrics = json.loads((tmp_path / "datasetddpm.json").read_text())
    masks = splits["test"][1]
    present = set(np.unique(masks).tolist()) - {255}
    ignored = int((masks == 255).sum())
    assert 1 in present and ignored > 0
    # the paper's protocol: the mean over all 11 classes, absent ones scoring 0; ignore pixels predicted as class 1
    # enlarge its union; every other present class is exact
    class_1 = (masks == 1).sum() / ((masks == 1).sum() + ignored)
    assert metrics["split"] == "test" and metrics["images"] == 3
    assert metrics["miou"] == pytest.approx((len(present) - 1 + class_1) / 11, abs=1e-6)
    assert metrics["miou_strict"] == 1.0  # ignore pixels out, absent classes out: a perfect prediction
    assert metrics["epoch"] == read_segnet(trained / "segnet.pt")["training"]["epoch"]
    assert metrics["synthetic_images"] == 6 and metrics["val_miou"] < 1.0  # val's ignore band counts too


def test_evaluate_segnet_with_the_real_network_writes_finite_metrics(project, trained, tmp_path, monkeypatch):
    root, params = project
    run(monkeypatch, evaluate_stage.main, "--params", params, "--segnet", trained / "segnet.pt", "--data",
        root / "prepared", "--metrics", tmp_path / "datasetddpm.json")
    metrics = json.loads((tmp_path / "datasetddpm.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and metrics["val_miou"] == read_segnet(trained / "segnet.pt")["training"]["val_miou"]


def test_segment_model_segnet_runs_the_network_on_a_folder_and_matches_the_api(project, trained, tmp_path, monkeypatch):
    root, params = project
    rng = np.random.default_rng(5)
    images = tmp_path / "images"
    for index in range(2):
        write_example(images, f"new_{index}", square_example(rng, index)[0], None)
    large = np.kron(square_example(rng, 2)[0], np.ones((2, 2, 1), np.uint8))  # 64 px: resized to 32, mapped back
    write_example(images, "large", large, None)
    run(monkeypatch, segment_stage.main, "--params", params, "--model", "segnet", "--segnet", trained / "segnet.pt",
        "--images", images, "--out", tmp_path / "out")

    (run_folder := tmp_path / "run" / "segnet").mkdir(parents=True)
    (run_folder / "segnet.pt").write_bytes((trained / "segnet.pt").read_bytes())
    (tmp_path / "run" / "params.yaml").write_text(params.read_text())
    segmenter = Segmenter.from_run(tmp_path / "run", model="segnet")
    assert isinstance(segmenter, SegnetSegmenter)
    for stem in ("new_0", "new_1", "large"):
        written = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        result = segmenter.predict(images / f"{stem}.png")[0]
        assert np.array_equal(written, result.mask)
        assert (tmp_path / "out" / f"{stem}.overlay.png").is_file()
    assert written.shape == (64, 64)
    direct, _ = segment_images(segmenter.network, np.stack([np.asarray(Image.open(images / "new_0.png"))]))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "new_0.png")), direct[0])


def test_a_segnet_trained_for_other_params_is_refused_naming_the_key(project, trained, tmp_path):
    _, params = project
    data = yaml.safe_load(params.read_text())
    data["segnet"]["decoder_hidden_size"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SegnetError, match="segformer"):
        Segmenter.load_segnet(tmp_path / "params.yaml", trained / "segnet.pt")
    with pytest.raises(FileNotFoundError, match="dvc repro train_segnet"):
        Segmenter.load_segnet(params, tmp_path / "missing.pt")


@pytest.mark.parametrize("segnet, message", [
    ({"depths": [1, 1]}, "segnet.depths has 2"),
    ({"hidden_sizes": [32, 63, 128]}, r"segnet.hidden_sizes\[1\]=63 is not a multiple of segnet.attention_heads\[1\]=2"),
    ({"sr_ratios": [4, 2, 16]}, r"segnet.sr_ratios\[2\]=16 is more than encoder stage 2's map side 8"),
    ({"lr": -0.1}, "segnet.lr"),
    ({"epochs": 0}, "segnet.epochs"),
    ({"steps": 0}, "segnet.steps"),
    ({"batch_size": "8"}, "segnet.batch_size"),
    ({"hidden_size": 8}, "segnet.hidden_size"),
])
def test_bad_segnet_params_are_refused_at_load_naming_the_key(segnet, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict({"segnet": segnet})


def weights_run(project, tmp_path, weights, monkeypatch) -> dict[str, torch.Tensor]:
    """train_segnet for one epoch with segnet.weights set; the network's weights as training began."""
    root, _ = project
    params = write_params(tmp_path / "params.yaml", {**TINY_SEGNET, "segnet.epochs": 1, "segnet.weights": str(weights)})
    real_train, initial = train_stage.train_segnet, {}

    def recording(network, *args, **kwargs):
        initial.update({key: value.clone() for key, value in network.state_dict().items()})
        return real_train(network, *args, **kwargs)

    monkeypatch.setattr(train_stage, "train_segnet", recording)
    run(monkeypatch, train_stage.main, *train_args(root, params, tmp_path / "out"))
    return initial


def other_segformer(project, seed: int = 7, **changes) -> torch.nn.Module:
    """A SegFormer of the project's segnet params (some changed), drawn from another seed than the run's."""
    arguments = segformer_config(load_params(project[1]).segnet, 11)
    return build_network({**arguments, **changes}, seed=seed)


def test_segnet_weights_start_the_encoder_from_a_save_pretrained_folder_and_the_file_says_so(project, tmp_path,
                                                                                           monkeypatch):
    source = other_segformer(project)
    source.save_pretrained(tmp_path / "mit")  # as a user's local copy of nvidia/mit-b0, at the params' shapes
    initial = weights_run(project, tmp_path, tmp_path / "mit", monkeypatch)
    config = load_params(project[1]).segnet
    scratch = build_network(segformer_config(config, 11), seed=config.seed).state_dict()
    encoder = {key: value for key, value in initial.items() if key.startswith("segformer.")}
    assert encoder and all(torch.equal(value, source.state_dict()[key]) for key, value in encoder.items())
    assert not all(torch.equal(value, scratch[key]) for key, value in encoder.items())  # not the random init
    head = [key for key in initial if key.startswith("decode_head.")]
    assert head and all(torch.equal(initial[key], scratch[key]) for key in head)  # the head: the seeded fresh one
    training = read_segnet(tmp_path / "out" / "segnet.pt")["training"]
    assert training["init"] == {"path": str(tmp_path / "mit"), "sha256": path_sha256(tmp_path / "mit")}


@pytest.mark.parametrize("suffix, layout", [(".safetensors", "encoder"), (".pt", "network"), (".pt", "mit-b0")])
def test_segnet_weights_take_a_state_dict_of_the_encoder_or_the_whole_network(project, tmp_path, suffix, layout):
    from safetensors.torch import save_file
    from transformers import SegformerForImageClassification
    from transformers.core_model_loading import revert_weight_conversion

    source = other_segformer(project)
    if layout == "mit-b0":  # an ImageNet classifier with the older key names (segformer.encoder.block.*, classifier.*)
        source = SegformerForImageClassification(source.config)
        state = revert_weight_conversion(source, source.state_dict())
        assert any(key.startswith("segformer.encoder.block.") for key in state) and "classifier.weight" in state
    else:  # segformer.* and decode_head.* keys, or the encoder's alone
        state = source.state_dict() if layout == "network" else source.segformer.state_dict()
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    network = other_segformer(project, seed=0)
    record = load_encoder_weights(network, path)
    expected, fresh = source.segformer.state_dict(), other_segformer(project, seed=0)
    assert all(torch.equal(value, expected[key]) for key, value in network.segformer.state_dict().items())
    assert torch.equal(network.decode_head.classifier.weight, fresh.decode_head.classifier.weight)  # the head: fresh
    assert record == {"path": str(path), "sha256": path_sha256(path)}


@pytest.mark.parametrize("changes, key, param", [
    ({"hidden_sizes": [8, 24]}, "stages.1.patch_embeddings.proj.weight", r"segnet.hidden_sizes\[1\]"),
    ({"depths": [1, 2]}, "stages.1.blocks.1.", r"segnet.depths\[1\]"),
])
def test_segnet_weights_of_other_shapes_are_refused_naming_the_file_and_the_key(project, tmp_path, monkeypatch, capsys,
                                                                                changes, key, param):
    other_segformer(project, **changes).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as exit_info:
        weights_run(project, tmp_path, tmp_path / "other", monkeypatch)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"segnet.weights {tmp_path / 'other'} does not fit the segnet params" in error
    assert re.search(f"{re.escape(key)}.*Likely param: {param}", error), error
    assert "Set the segnet params to the shapes of the model in the file" in error
    assert not (tmp_path / "out" / "segnet.pt").exists()


def test_a_segnet_weights_folder_with_other_attention_heads_is_refused(project, tmp_path):
    other_segformer(project, num_attention_heads=[1, 1]).save_pretrained(tmp_path / "heads")  # same shapes
    with pytest.raises(SegnetError, match=r"num_attention_heads \[1, 1\] .*segnet.attention_heads is \[1, 2\]"):
        load_encoder_weights(other_segformer(project), tmp_path / "heads")


def test_a_missing_segnet_weights_file_is_refused_naming_the_param(project, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        weights_run(project, tmp_path, tmp_path / "absent.safetensors", monkeypatch)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"segnet.weights {tmp_path / 'absent.safetensors'} does not exist" in error
    (tmp_path / "noise.pt").write_bytes(b"not a tensor file")
    with pytest.raises(SegnetError, match=r"segnet.weights .*noise.pt cannot be read as a state dict"):
        load_encoder_weights(other_segformer(project), tmp_path / "noise.pt")
    (tmp_path / "junk").mkdir()  # a folder without a model file, then with a truncated one
    with pytest.raises(SegnetError, match=r"segnet.weights .*junk cannot be loaded as a SegFormer \(OSError"):
        load_encoder_weights(other_segformer(project), tmp_path / "junk")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"xx")
    with pytest.raises(SegnetError, match=r"segnet.weights .*junk cannot be loaded as a SegFormer"):
        load_encoder_weights(other_segformer(project), tmp_path / "junk")


def test_segnet_weights_null_and_the_placeholder_both_mean_a_random_init():
    assert params_from_dict({"segnet": {"weights": None}}).segnet.weights_path() is None
    assert params_from_dict({}).segnet.weights_path() is None  # models/scratch, as params.yaml says
    assert str(params_from_dict({"segnet": {"weights": "models/mit-b0"}}).segnet.weights_path()) == "models/mit-b0"
