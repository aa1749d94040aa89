"""Scale-out with torchrun: index sharding, global batches, and 2-process runs against 1-process runs.

The 2-process tests start ``python -m torch.distributed.run --standalone --nproc_per_node=2`` (gloo
on the CPU), exactly as a user would with ``torchrun``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from twostage_ad.config import AugmentConfig
from twostage_ad.distributed import DistributedContext, GlobalBatchSampler
from twostage_ad.runs import load_checkpoint
from twostage_ad.stages.attention import DefectDataset

HERE = Path(__file__).parent
TINY = ["--set", "stage1.epochs=2", "--set", "stage2.epochs=2", "--set", "stage1.base_width=8", "--set", "stage1.max_width=32",
        "--set", "stage2.width_divisor=16"]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False,
    )


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


# ---------------------------------------------------------------------------------------------
# one process: the pieces


@given(n=st.integers(0, 500), world=st.integers(1, 8))
def test_shards_cover_every_index_once_in_order(n, world):
    shards = [DistributedContext(rank=r, world_size=world).shard(n) for r in range(world)]
    covered = [i for s in shards for i in range(n)[s]]
    assert covered == list(range(n))
    sizes = [len(range(n)[s]) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # no padding, no repeats (DistributedSampler would repeat)


def test_ranks_slice_the_same_global_batches_as_one_process():
    def batches(rank: int, world: int) -> list[list[int]]:
        sampler = GlobalBatchSampler(50, 8, torch.Generator().manual_seed(3), DistributedContext(rank=rank, world_size=world))
        return [b for _ in range(2) for b in sampler]  # two epochs

    single = batches(0, 1)
    rank0, rank1 = batches(0, 2), batches(1, 2)
    assert len(single) == 2 * (50 // 8)
    assert [a + b for a, b in zip(rank0, rank1)] == single
    assert single[:6] != single[6:]  # a new order each epoch


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 4 processes"):
        GlobalBatchSampler(40, 10, torch.Generator(), DistributedContext(rank=0, world_size=4))


def test_a_synthetic_defect_depends_on_seed_epoch_and_image_only():
    images = (np.random.default_rng(0).random((6, 32, 32, 1)) * 255).astype(np.uint8)
    dataset = DefectDataset(images, AugmentConfig(probability=1.0), seed=5)
    first = dataset[(2, 4)]
    for key in [(1, 0), (2, 3), (7, 4)]:  # other draws in between (another rank would not make them)
        dataset[key]
    again = dataset[(2, 4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(dataset[(3, 4)][0], first[0])  # another epoch, another defect


# ---------------------------------------------------------------------------------------------
# two processes


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """tests/ddp_worker.py on 1 process and on 2 (torchrun): trained weights and a BatchNorm check."""
    folder = tmp_path_factory.mktemp("ddp")
    single, double = folder / "single.pt", folder / "ddp.pt"
    reference = _run(str(HERE / "ddp_worker.py"), str(single), cwd=folder)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ddp = _torchrun(str(HERE / "ddp_worker.py"), str(double), cwd=folder)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    return a, b


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(worker_results):
    one, two = (r["batchnorm_check"] for r in worker_results)
    for key in ("out", "grad", "weight_grad", "running_mean", "running_var"):  # running_var: unbiased over all 8 images
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_epochs_on_two_processes_make_the_same_updates_as_one(worker_results):
    """4 SGD steps per stage (SGD: a gradient off by any factor shows in the weights)."""
    a, b = worker_results
    assert b["batchnorm"] == ["BatchNorm2d"]  # the global-statistics BatchNorm is undone after training
    for name in ("stage1", "stage1_d", "stage2", "stage2_d"):
        for key, value in a[name].items():
            if value.is_floating_point():
                torch.testing.assert_close(b[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    for stage in ("stage1", "stage2"):
        for epoch in range(2):
            for key, value in a["history"][stage][epoch].items():
                if key not in ("seconds", "epoch"):
                    assert b["history"][stage][epoch][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (stage, epoch, key)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    done = _run("-m", "twostage_ad.pipeline", "-q", "run", *TINY, "--output", str(folder / "run"), cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run"


def test_torchrun_pipeline_matches_one_process_and_rank0_alone_writes(single_run, tmp_path):
    run_dir = tmp_path / "run"
    done = _torchrun("-m", "twostage_ad.pipeline", "run", *TINY, "--output", str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no second folder from rank 1
    assert " INFO " in done.stderr  # rank 0 logs its progress; rank 1 warnings only
    assert not any(line.startswith("[rank 1]") and " INFO " in line for line in done.stderr.splitlines())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reference = json.loads((single_run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and reference["processes"] == 1
    ours, theirs = pd.read_csv(run_dir / "scores.csv"), pd.read_csv(single_run / "scores.csv")
    assert ours["image"].tolist() == theirs["image"].tolist()  # every image once, in order (no padding)
    # two epochs of GAN training: rounding differences stay small, not bit-identical
    # the screening's raw terms, weighted as the digits config weighs them (the loss itself now adds the attention and
    # feature terms in z units of the training normals, near 0, where a relative tolerance means nothing)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["stage1"]
    raw = [config["screen_con"] * t["stage1_recon"] + config["screen_enc"] * t["stage1_latent"]
           + config["screen_att"] * t["stage1_att_topk"] for t in (ours, theirs)]
    np.testing.assert_allclose(raw[0], raw[1], rtol=0.05)
    for stage in ("stage1", "cascade"):
        assert metrics["image_auroc"][stage] == pytest.approx(reference["image_auroc"][stage], abs=0.02)
    history, reference_history = (json.loads((d / "history.json").read_text()) for d in (run_dir, single_run))
    for stage in ("stage1", "stage2"):
        assert history[stage][0]["total"] == pytest.approx(reference_history[stage][0]["total"], rel=1e-3)


def test_torchrun_scoring_is_sharded_by_index_and_equals_one_process(single_run, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = single_run / "checkpoints"
    done = _torchrun("-m", "twostage_ad.pipeline", "-q", "run", *TINY, "--output", str(run_dir),
                     "--stage1-from", str(checkpoints / "stage1.pt"), "--stage2-from", str(checkpoints / "stage2.pt"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = pd.read_csv(run_dir / "scores.csv"), pd.read_csv(single_run / "scores.csv")
    assert ours["image"].tolist() == theirs["image"].tolist()
    for column in ("stage1_loss", "stage1_att_topk", "stage2_score", "cascade_score"):
        # shards change batch shapes and so the float32 kernels' summation order: agreement to float32
        # rounding of the column's largest magnitude (a score near zero is a difference of larger terms)
        scale = max(1.0, float(theirs[column].abs().max()))
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-5, atol=1e-5 * scale, err_msg=column)
    assert (ours["decision"] == theirs["decision"]).all()
    maps, reference_maps = (np.load(d / "maps" / "test_maps.npz") for d in (run_dir, single_run))
    np.testing.assert_array_equal(maps["stage1"], reference_maps["stage1"])


def _kill_launcher_and_ranks(pid: int) -> None:
    """SIGKILL a torchrun launcher and its ranks, which it starts in sessions of their own."""
    try:
        ranks = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        ranks = []
    for group in (pid, *ranks):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["epoch"])
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError):
        return 0


def test_a_killed_torchrun_run_resumes_under_torchrun_to_the_uninterrupted_result(tmp_path):
    settings = [*TINY, "--set", "stage1.epochs=6", "--set", "run.overlays=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    reference = tmp_path / "reference"
    done = _torchrun("-m", "twostage_ad.pipeline", "-q", "run", *settings, "--output", str(reference), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "twostage_ad.pipeline", "-q", "run", *settings, "--output", str(run_dir)],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        checkpoint = run_dir / "checkpoints" / "stage1.pt"
        deadline = time.time() + 300
        while _checkpoint_epoch(checkpoint) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        _kill_launcher_and_ranks(proc.pid)  # as a lost node would
        proc.wait()
    killed_at = _checkpoint_epoch(checkpoint)
    assert 2 <= killed_at < 6, f"the run was not caught mid-training (epoch {killed_at}): {log.read_text()[-2000:]}"
    assert not (run_dir / "scores.csv").exists()
    before_kill = load_checkpoint(checkpoint)["history"]
    assert len(before_kill) == killed_at  # nothing trained on after the kill
    resumed = _torchrun("-m", "twostage_ad.pipeline", "-q", "run", "--output", str(run_dir), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # resumed, not retrained: the epochs before the kill are the killed run's own (their timings included)
    history = json.loads((run_dir / "history.json").read_text())["stage1"]
    assert history[:killed_at] == before_kill
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == {"stage1": 6, "stage2": 2}
    ours, theirs = pd.read_csv(run_dir / "scores.csv"), pd.read_csv(reference / "scores.csv")
    assert ours["image"].tolist() == theirs["image"].tolist()
    for column in ("stage1_loss", "stage2_score", "cascade_score"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-4, atol=1e-6, err_msg=column)
