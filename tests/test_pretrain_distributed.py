"""Pretraining on two CPU ranks (gloo, DDP): the same recipe as one process, a lost rank stops the run, and
the run resumes from its last state. Ranks listen on 127.0.0.1 only, on a port the OS reports free."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing
from PIL import Image

from pipeline.config import Autocast, LossWeighting, LrSchedule, TrainConfig
from pipeline.diffusion import distributed
from pipeline.diffusion.distributed import World, world_from_env
from pipeline.diffusion.gaussian import Diffusion
from pipeline.diffusion.train import batch_at, check_same_start, load_checkpoint, train_ddpm
from pipeline.diffusion.unet import create_unet
from pipeline.errors import ConfigError
from tests.conftest import REPO
from tests.helpers import write_params

TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
        "attention_resolutions": [8], "num_head_channels": 32, "use_scale_shift_norm": True,
        "resblock_updown": False, "learn_sigma": True, "dropout": 0.0}
IMAGES = (np.random.default_rng(0).random((24, 16, 16, 3)) > 0.6).astype(np.uint8) * 255
# float32 (autocast none): the tolerances below are float32 round-off; bf16 products would round the shares'
# convolutions differently and the comparison would measure bf16, not DDP
CONFIG = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, lr_schedule=LrSchedule.COSINE,
                     loss_weighting=LossWeighting.MIN_SNR, ema_rate=0.9, autocast=Autocast.NONE)
# Two ranks compute each half-batch's mean gradient and DDP averages them: the full batch's mean up to the
# order of float sums (and the convolutions' blocking over 4 images instead of 8), as a change of torch's thread
# count is. Adam divides each gradient by its running RMS, so where a gradient is only round-off (a conv bias
# that the next per-channel GroupNorm cancels) the step's sign is that round-off's: such weights differ by up to
# lr per step, in directions the loss does not see. Hence one tolerance over all the weights, not per tensor.
# Measured here over 6 steps (tiny UNet, learn_sigma; printed with -s): losses differ by 8e-8 relative (a float32
# ulp), weights by 5.2e-6 of their norm (2.1e-4 of their change over the run), the EMA likewise; one process on
# 2 threads against 1 thread differs by 7.5e-6 of the norm (3.0e-4 of the change). Tolerances: ~10x that.
LOSS_RTOL = 1e-6
WEIGHT_RTOL = 5e-5  # ||two ranks - one process|| / ||one process||, over all the weights (and over the EMA's)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def relative_difference(weights: dict, reference: dict) -> float:
    """||weights - reference|| / ||reference|| over all the tensors together."""
    difference = sum(((weights[name].double() - value.double()) ** 2).sum() for name, value in reference.items())
    return float(difference.sqrt() / sum((value.double() ** 2).sum() for value in reference.values()).sqrt())


def train_one_process() -> tuple[dict, dict, list]:
    torch.manual_seed(0)
    model = create_unet(TINY)
    ema, history = train_ddpm(model, Diffusion("linear", 1000), IMAGES, CONFIG, device=torch.device("cpu"))
    return model.state_dict(), ema.state_dict(), history


def rank_main(rank: int, port: int, out: str) -> None:  # a rank of the two-rank run (spawned, so module level)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = World(rank, 2, rank)
    device = distributed.start(world, "cpu")
    try:
        torch.manual_seed(0)
        model = create_unet(TINY)
        ema, history = train_ddpm(model, Diffusion("linear", 1000), IMAGES, CONFIG, device=device, world=world)
        try:  # as if only rank 0 could see a resumable state (a folder that is not shared)
            check_same_start({"step": 4} if world.main else None, Path("run/ddpm.pt.state"), world)
            refused = ""
        except ConfigError as error:
            refused = str(error)
        torch.save({"model": model.state_dict(), "ema": None if ema is None else ema.state_dict(), "history": history,
                    "refused": refused}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.stop(world)


def test_two_gloo_ranks_train_what_one_process_trains_on_the_same_global_batch(tmp_path):
    start = time.perf_counter()
    torch.multiprocessing.start_processes(rank_main, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    two_ranks_s = time.perf_counter() - start
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    torch.manual_seed(0)
    start_weights = create_unet(TINY).state_dict()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as each rank
        model, ema, history = train_one_process()
        torch.set_num_threads(2)  # the control: what another float order does to one process
        other_threads, _, _ = train_one_process()
    finally:
        torch.set_num_threads(threads)

    assert ranks[1]["ema"] is None and ranks[0]["ema"] is not None  # rank 0 alone keeps the EMA
    for name, value in ranks[0]["model"].items():  # DDP keeps the ranks' weights equal, bit for bit
        assert torch.equal(value, ranks[1]["model"][name]), name
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank logs the global batch's losses
    for rank in ranks:  # ranks that found different resumable states all stop, saying why
        assert "the ranks found different resumable states at run/ddpm.pt.state (steps by rank: [4, 0]" in rank["refused"]

    loss_error = max(abs(two[key] - one[key]) / abs(one[key])
                     for one, two in zip(history, ranks[0]["history"], strict=True) for key in one)
    weight_error = relative_difference(ranks[0]["model"], model)
    ema_error = relative_difference(ranks[0]["ema"], ema)
    thread_error = relative_difference(other_threads, model)
    change = relative_difference(model, start_weights)
    print(f"\n2 gloo ranks vs 1 process, {CONFIG.steps} steps: losses {loss_error:.1e} relative, weights {weight_error:.1e} "
          f"of their norm ({weight_error / change:.1e} of their change), EMA {ema_error:.1e}; 1 process on 2 threads "
          f"vs 1: weights {thread_error:.1e}. The 2 ranks took {two_ranks_s:.1f} s")
    assert loss_error < LOSS_RTOL
    assert weight_error < WEIGHT_RTOL and ema_error < WEIGHT_RTOL
    assert 0 < loss_error or 0 < weight_error  # two ranks really ran: sums in another order differ somewhere


def test_a_rank_reads_its_own_disjoint_share_of_each_global_batch():
    world_batches = [batch_at(IMAGES, 8, 0, 4, World(rank, 2).share(8)) for rank in (0, 1)]
    assert [len(batch) for batch in world_batches] == [4, 4]
    assert torch.equal(torch.cat(world_batches), batch_at(IMAGES, 8, 0, 4))
    with pytest.raises(ConfigError, match="batch_size=8 does not split evenly across 3 ranks; use a multiple of 3"):
        train_ddpm(create_unet(TINY), Diffusion("linear", 1000), IMAGES, CONFIG, device=torch.device("cpu"),
                   world=World(0, 3))


def test_the_world_comes_from_torchrun_variables_and_bad_ones_are_named():
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "1"}) == World(3, 4, 1)
    with pytest.raises(ConfigError, match="RANK=4 is not a rank of WORLD_SIZE=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="MASTER_ADDR/MASTER_PORT are not set"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="DDPM_SEG_DIST_TIMEOUT='soon' is not a positive number"):
        distributed.timeout_s({"DDPM_SEG_DIST_TIMEOUT": "soon"})


class Project:
    """A pretrain stage's inputs under ``root``, and its command line; ranks started as torchrun starts them."""

    def __init__(self, root: Path, timeout_s: int):
        self.params = write_params(root / "params.yaml", {"ddpm.train.steps": 24, "ddpm.train.state_every": 4,
                                                          "ddpm.train.batch_size": 8, "ddpm.model.dropout": 0.1})
        self.data = root / "prepared"  # pretrain reads unlabeled/ only: 16 random 32 px images stand in for prepare's
        (self.data / "unlabeled").mkdir(parents=True)
        for index, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)):
            Image.fromarray(pixels).save(self.data / "unlabeled" / f"{index:02d}.png")
        self.env = dict(os.environ, PYTHONPATH=str(REPO), DDPM_SEG_THREADS="1", OMP_NUM_THREADS="1",
                        MASTER_ADDR="127.0.0.1", DDPM_SEG_DIST_TIMEOUT=str(timeout_s))

    def arguments(self, out: Path) -> list[str]:
        return ["-m", "stages.pretrain", "--params", str(self.params), "--data", str(self.data),
                "--out", str(out), "--curves", str(out.with_suffix(".curves"))]

    def launch(self, out: Path) -> list[subprocess.Popen]:  # what torchrun does: one process per rank
        port = free_port()
        return [subprocess.Popen([sys.executable, *self.arguments(out)], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=dict(self.env, RANK=str(rank), LOCAL_RANK=str(rank),
                                                                             WORLD_SIZE="2", MASTER_PORT=str(port)))
                for rank in (0, 1)]


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert path.exists(), f"no resumable state appeared at {path}: " + (process.communicate()[1][-3000:]
                                                                         if process.poll() is not None else "timed out")


@pytest.mark.slow  # 8 processes start torch (2 torchrun agents, 3 x 2 ranks): ~35 s of CPU
def test_a_killed_rank_stops_the_other_and_the_run_resumes_to_the_unbroken_checkpoint(tmp_path):
    project = Project(tmp_path, timeout_s=60)
    arguments, launch, env = project.arguments, project.launch, project.env

    # The unbroken run, through torchrun as docs/scaling.md launches two machines: here two "nodes" of one rank
    # each, both on 127.0.0.1, with a static rendezvous at node 0.
    whole = tmp_path / "unbroken" / "trained.pt"  # torch.save records the file's name: the same name in another folder
    whole.parent.mkdir()
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *arguments(whole)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for node in (0, 1)]
    logs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][1][-3000:] + logs[1][1][-3000:]
    assert load_checkpoint(whole)[2]["source"] == {"kind": "trained", "steps": 24, "unlabeled_images": 16, "ema_rate": 0.999,
                                                   "ranks": 2}

    out = tmp_path / "trained.pt"
    state = tmp_path / "trained.pt.state"
    ranks = launch(out)
    wait_for(state, ranks[0])
    ranks[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = ranks[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        pytest.fail("rank 0 hung after rank 1 was killed")
    ranks[1].communicate()
    stopped_in = time.time() - killed_at
    assert ranks[0].returncode == 2, err[-3000:]
    assert "pretrain rank 0 of 2 stopped: a collective failed" in err and "resumes from it" in err, err[-3000:]
    assert stopped_in < 30  # the peer's closed socket is noticed at once, well before the 60 s timeout
    assert state.exists() and not out.exists(), "the kill should land mid-training, after a state was written"
    saved = torch.load(state, weights_only=True)
    assert 4 <= saved["step"] < 24 and len(saved["rank_torch_rng"]) == 2  # each rank's dropout generator

    ranks = launch(out)
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert f"resuming from step {saved['step']}" in outputs[0][0]
    assert out.read_bytes() == whole.read_bytes()  # the resumed run's checkpoint is the unbroken run's
    assert (out.with_suffix(".curves") / "plots/metrics/loss.tsv").read_bytes() == \
        (whole.with_suffix(".curves") / "plots/metrics/loss.tsv").read_bytes()
    assert not state.exists()
    print(f"\nrank 0 stopped {stopped_in:.1f} s after rank 1 was killed at step {saved['step']} or later")


@pytest.mark.slow  # ~20 s: two ranks start, then one waits out the timeout
def test_a_hung_rank_is_given_up_on_after_the_timeout(tmp_path):
    # 10 s: the timeout also bounds how far apart the ranks may reach the process group's start-up
    project = Project(tmp_path, timeout_s=10)
    out = tmp_path / "trained.pt"
    ranks = project.launch(out)
    wait_for(out.with_name("trained.pt.state"), ranks[0])
    ranks[1].send_signal(signal.SIGSTOP)  # alive, its sockets open, but silent
    hung_at = time.time()
    try:
        _, err = ranks[0].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        pytest.fail("rank 0 waited for ever for a hung rank")
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    waited = time.time() - hung_at
    assert ranks[0].returncode == 2, err[-3000:]
    assert "pretrain rank 0 of 2 stopped: a collective failed" in err and "DDPM_SEG_DIST_TIMEOUT=10 s" in err, err[-3000:]
    assert 9 < waited < 60 and not out.exists()
    print(f"\nrank 0 gave up {waited:.1f} s after rank 1 hung (DDPM_SEG_DIST_TIMEOUT=10)")
