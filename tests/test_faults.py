"""Nothing lost at any moment: a run killed (SIGKILL) at many moments resumes to the uninterrupted run; SIGTERM
and SIGINT stop at an update boundary and the run continues from that update; a failed write (a full disk)
keeps the previous file and leaves no temporary file; run directories are claimed atomically."""

import errno
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.faults import Stopped
from kit.inference.checkpoint import read_payload
from kit.training.run import new_run_dir, resume, train

TIMING = ["seconds", "images_per_s"]
UPDATES_PER_EPOCH = 74  # 1,197 demo training images // batch 16


def _metrics(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=TIMING)


def _same_weights(a, b) -> bool:
    x, y = (torch.load(r / "last.pt", weights_only=True) for r in (a, b))
    return all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]) and \
        all(torch.equal(x["ema"][k], y["ema"][k]) for k in x["ema"])


# Signals: stop at the next update boundary, save the position inside the epoch, resume from that update.

@pytest.mark.parametrize("signal_name, code", [("sigterm", 143), ("sigint", 130)])
def test_a_signal_mid_epoch_stops_at_an_update_and_the_run_continues_from_it(signal_name, code, demo_data, trained_run,
                                                                             tmp_path, monkeypatch, quiet, tiny_recipe):
    # the signal arrives just before update 100 (epoch 2), and again while last.pt is being written
    monkeypatch.setenv("KIT_FAULT", f"{signal_name}:update:100,{signal_name}:write:last.pt@2")
    with pytest.raises(Stopped) as stopped:
        train(tiny_recipe(), demo_data, tmp_path, "cpu", echo=quiet)
    (run_dir,) = tmp_path.iterdir()
    assert stopped.value.exit_code == code
    assert str(stopped.value).startswith(f"stopped by {signal_name.upper()} at update 101 (27 of 74 in epoch 2); saved in ")
    assert str(stopped.value).endswith(f"continue with kit train --resume {run_dir}")
    saved = read_payload(run_dir / "last.pt")
    assert (saved["epoch"], saved["in_epoch"], saved["num_updates"]) == (1, 27, 101)
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1]
    monkeypatch.delenv("KIT_FAULT")
    lines = []
    resume(run_dir, device="cpu", echo=lines.append)
    assert f"resuming {run_dir} after epoch 1 of 3, 27 updates into epoch 2" in lines
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(trained_run))
    assert _same_weights(run_dir, trained_run)


def test_a_run_without_a_checkpoint_resumes_from_the_start(demo_data, trained_run, tmp_path):
    run_dir = tmp_path / "demo-killed-in-epoch-1"
    run_dir.mkdir()
    shutil.copy(trained_run / "recipe.yaml", run_dir / "recipe.yaml")  # all a kill in the first epoch leaves
    (run_dir / ".last.pt.x1.tmp").write_bytes(b"half a checkpoint")
    lines = []
    resume(run_dir, device="cpu", echo=lines.append)
    assert lines[0] == f"{run_dir}: no checkpoint yet: training it from the start (its recipe.yaml, train.seed 0)"
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(trained_run))
    assert _same_weights(run_dir, trained_run) and not list(run_dir.glob(".*.tmp"))


def test_resume_rewrites_a_metrics_file_written_ahead_of_last_pt(demo_data, trained_run, tmp_path, quiet):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    payload = torch.load(run_dir / "last.pt", weights_only=True)
    ahead = pd.concat([pd.read_csv(run_dir / "metrics.csv")] * 2)  # rows last.pt does not record
    ahead.to_csv(run_dir / "metrics.csv", index=False)
    resume(run_dir, ("train.epochs=4",), device="cpu", echo=quiet)
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2, 3, 4] and payload["epoch"] == 3


# Kills at many moments, in subprocesses, each resumed and compared with the uninterrupted run.

ENV = {**os.environ, "PYTHONPATH": str(RECIPES_DIR.parent), "OMP_NUM_THREADS": "1"}
SETTINGS = ["--set", "train.epochs=2", "--set", "schedule.name=constant", "--set", "optim.lr=0.004", "--device", "cpu"]
MOMENTS = {  # KIT_FAULT -> what the killed process should have ended with
    "update:30": -9,  # inside the first epoch: no checkpoint yet
    "write:last.pt": -9,  # epoch 1's last.pt fully written to its temporary name, not renamed
    "saved:metrics.csv@2": -9,  # between the files of epoch 2's save
    "saved:best.pt@2": None,  # between best.pt and last.pt (only if epoch 2 is the best: else it finishes)
    "update:100": -9,  # inside epoch 2, after a checkpoint
    "saved:last.pt@2": -9,  # after the last epoch's save, before the process ends
    "sigterm:update:100": 143,  # a real SIGTERM mid-epoch: saved, exit 143
}


def _kit(*args, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "KIT_FAULT": fault} if fault else ENV
    return subprocess.run([sys.executable, "-m", "kit.cli", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def _killed_then_resumed(fault: str, demo_data, root) -> tuple:
    out = root / fault.replace(":", "_").replace("@", "_")
    killed = _kit("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--runs", out, *SETTINGS, fault=fault)
    (run_dir,) = out.iterdir()
    visible = {p.name: read_payload(p)["epoch"] for p in run_dir.glob("*.pt")}  # never a half-written checkpoint
    resumed = _kit("train", "--resume", run_dir, "--device", "cpu")
    return killed, resumed, run_dir, visible


@pytest.mark.slow
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_run(demo_data, tmp_path):
    whole = _kit("train", RECIPES_DIR / "demo.yaml", "--data-root", demo_data, "--runs", tmp_path / "whole", *SETTINGS)
    assert whole.returncode == 0, whole.stderr
    (reference,) = (tmp_path / "whole").iterdir()
    best_epoch = int(torch.load(reference / "last.pt", weights_only=True)["best_epoch"])
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time on two cores
        results = dict(zip(MOMENTS, pool.map(lambda f: _killed_then_resumed(f, demo_data, tmp_path), MOMENTS)))
    for fault, (killed, resumed, run_dir, visible) in results.items():
        expected = MOMENTS[fault]
        assert killed.returncode == expected or (expected is None and killed.returncode in (-9, 0)), (fault, killed.stderr)
        if expected == 143:
            assert killed.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM at update 101"), killed.stderr
        assert resumed.returncode == 0, (fault, resumed.stderr)
        pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(reference), obj=fault)
        assert _same_weights(run_dir, reference), fault
        assert read_payload(run_dir / "best.pt")["epoch"] == best_epoch, fault
        assert not list(run_dir.glob(".*.tmp")), fault
        assert all(epoch <= 2 for epoch in visible.values()), (fault, visible)


# A full disk: every write site keeps its previous file and leaves no temporary file.

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fails_after_writing(target):
    """A writer that starts its file (as a real one would) and then runs out of space."""
    def write(*args, **kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, (str, os.PathLike)) and ".tmp" in str(a):
                with open(a, "wb") as f:
                    f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def _error_line(code: int, out: str) -> tuple[int, str]:
    """The CLI's error line (training printed its own lines to stdout before it)."""
    assert "Traceback" not in out, out
    return code, "\n".join(line for line in out.splitlines() if line.startswith("error: ")) or out


@pytest.mark.parametrize("writer, written", [
    ("torch.save", ("best.pt", "last.pt")),  # the first checkpoint of the save (best.pt when epoch 4 is the best)
    ("pathlib.Path.write_text", ("metrics.csv",)),
    ("matplotlib.figure.Figure.savefig", ("curves.png",)),
])
def test_a_full_disk_during_a_save_keeps_the_run_resumable(writer, written, trained_run, tmp_path, monkeypatch,
                                                           assert_one_line_error, quiet, run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    monkeypatch.setattr(writer, _fails_after_writing(writer))
    code, line = _error_line(*run("train", "--resume", run_dir, "--set", "train.epochs=4", "--device", "cpu"))
    assert_one_line_error(code, line, "could not be written (No space left on device); its previous version is kept")
    name = next(n for n in written if f"{run_dir / n}: could not be written" in line)
    assert (run_dir / name).read_bytes() == before[name]
    assert (run_dir / "last.pt").read_bytes() == before["last.pt"] and not list(run_dir.glob(".*.tmp"))
    monkeypatch.undo()  # space is free again
    resume(run_dir, ("train.epochs=4",), device="cpu", echo=quiet)
    assert list(pd.read_csv(run_dir / "metrics.csv").epoch) == [1, 2, 3, 4]


def test_a_torch_save_failure_by_text_is_a_write_error(trained_run, tmp_path, monkeypatch):
    from kit.inference.checkpoint import save_checkpoint
    monkeypatch.setattr("torch.save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")))
    with pytest.raises(Exception, match=r"last.pt: could not be written \(.*file write failed\); its previous version is kept"):
        save_checkpoint({"x": 1}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command, writer, target", [
    ("predict", "pandas.DataFrame.to_csv", "s.csv"),
    ("predict", "numpy.savez", "s.probs.npz"),
    ("report", "pathlib.Path.write_text", "report/per_class.csv"),
    ("export", "safetensors.torch.save_file", "m.safetensors"),
])
def test_a_full_disk_keeps_the_previous_output(command, writer, target, trained_run, demo_data, tmp_path, monkeypatch,
                                               assert_one_line_error, run):
    args = {"predict": ["predict", trained_run, "--test", demo_data / "cifar_test_nolabel.pkl", "--out", tmp_path / "s.csv"],
            "report": ["report", trained_run, "--report-dir", tmp_path / "report"],
            "export": ["export", trained_run, "--format", "safetensors", "--out", tmp_path / "m.safetensors"]}[command]
    args += ["--device", "cpu"] if command != "export" else []
    first_code, first = run(*args)
    assert first_code == 0, first
    path = tmp_path / target if command != "report" else tmp_path / "report" / trained_run.name / "per_class.csv"
    before = path.read_bytes()
    if writer == "numpy.savez":
        monkeypatch.setattr(np, "savez", _no_space)
    else:
        monkeypatch.setattr(writer, _fails_after_writing(writer))
    assert_one_line_error(*_error_line(*run(*args)), f"{path}: could not be written")
    assert path.read_bytes() == before and not list(path.parent.glob(".*.tmp"))


# Run directories: claimed by creating them.

def _claim(args) -> str:
    root, start = args
    start.wait()
    return str(new_run_dir(root, "demo", stamp="20261202-120000"))


def test_runs_started_in_the_same_second_each_claim_their_own_directory(tmp_path):
    context = multiprocessing.get_context("fork")
    start = context.Manager().Event()
    with context.Pool(12) as pool:
        waiting = pool.map_async(_claim, [(tmp_path, start)] * 12)
        start.set()
        claimed = waiting.get(timeout=60)
    assert len(set(claimed)) == 12 and len(list(tmp_path.iterdir())) == 12


def _vote(rank: int, init_file: str, answers) -> None:
    import torch.distributed as dist

    from kit.training.distributed import Ranks, any_rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    answers[rank] = [any_rank(rank == 1, Ranks(rank, 2), torch.device("cpu")), any_rank(False, Ranks(rank, 2), torch.device("cpu"))]
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank(tmp_path):
    """Under torchrun the stop flag is agreed between updates: a signal seen by rank 1 alone stops rank 0 too."""
    context = multiprocessing.get_context("spawn")
    answers = context.Manager().dict()
    workers = [context.Process(target=_vote, args=(r, str(tmp_path / "store"), answers)) for r in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert dict(answers) == {0: [True, False], 1: [True, False]}
