"""Untrusted files: checkpoints load weights only; a file that would run code is refused unexecuted."""

import pathlib

import pytest
import torch

from twostage_ad.detector import TwoStageDetector
from twostage_ad.runs import load_checkpoint, save_checkpoint
from twostage_ad.stages.attention import AttentionStage


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "stage1.pt"
    torch.save({"format": "twostage_ad.stage1/1", "model": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        AttentionStage.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is dangerous: a plain load runs it
    assert marker.exists()


def test_malicious_checkpoint_inside_a_run_folder_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("stage1.pt", "stage2.pt"):
        torch.save({"model": _Payload(marker)}, tmp_path / "run" / "checkpoints" / name)
    (tmp_path / "run" / "thresholds.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        TwoStageDetector.from_run(tmp_path / "run")
    assert not marker.exists()


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "ok.pt"
    save_checkpoint(path, {"format": "x", "weights": torch.zeros(1000)})
    assert load_checkpoint(path)["weights"].shape == (1000,)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_checkpoint(path)
