"""Hardware: automatic precision with the device stood in, fp16 loss scaling inside the update (skips a
non-finite update on the device, lowers the scale, counts it), and `kit doctor` on the CPU and on a stood-in GPU."""

import pandas as pd
import pytest
import torch

from kit.cli import RECIPES_DIR
from kit.cli.doctor import has_kernels
from kit.device import choose_precision, inference_precision
from kit.training.run import train

CUDA = torch.device("cuda")


def _stand_in_gpu(monkeypatch, capability, bf16_native, arch=("sm_80", "sm_90"), name="Stand-in GPU"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))


@pytest.mark.parametrize("capability, bf16_native, expected", [
    ((9, 0), True, "bf16"),  # H100/H200
    ((8, 0), True, "bf16"),  # A100
    ((7, 5), False, "fp16"),  # T4: is_bf16_supported() still says True, through emulation
    ((7, 0), False, "fp16"),  # V100
    ((6, 0), False, "fp32"),  # P100
])
def test_auto_precision_follows_the_compute_capability(capability, bf16_native, expected, monkeypatch):
    _stand_in_gpu(monkeypatch, capability, bf16_native)
    name, why = choose_precision("auto", CUDA)
    assert name == expected and why.startswith(f"auto: compute capability {capability[0]}.{capability[1]}")
    assert choose_precision("bf16", CUDA)[0] == "bf16"  # an explicit choice stands
    assert inference_precision(CUDA).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[expected]
    assert choose_precision("fp16", torch.device("cpu")) == ("fp32", "the CPU trains and predicts in fp32")


def test_an_injected_inf_skips_the_update_halves_the_scale_and_is_counted(demo_data, tiny_trainer):
    trainer = tiny_trainer(RECIPES_DIR / "demo.yaml", demo_data, overrides=("train.precision=fp16",))
    assert trainer.scaler is not None and trainer.capture is False  # fp16 on the CPU: the same scaler code, fp32 math
    trainer.forward_loss.train()
    for _ in range(3):
        trainer.update()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    scale = trainer.scaler.get_scale()
    hook = next(trainer.model.parameters()).register_hook(lambda grad: grad * float("inf"))
    trainer.update()
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, trainer.optimizer.state.values()))  # Adam's count too
    assert trainer.scaler.get_scale() == scale / 2 and int(trainer.skipped_sum) == 1
    trainer.update()  # a clean update steps again
    assert not all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))
    assert int(trainer.skipped_sum) == 1


def test_skipped_updates_are_a_metrics_column(demo_data, tmp_path, quiet, tiny_recipe):
    run_dir = train(tiny_recipe(train__precision="fp16", train__epochs=1), demo_data, tmp_path, "cpu", echo=quiet)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert "skipped_updates" in metrics.columns and metrics.skipped_updates.tolist() == [0]


def test_has_kernels_reads_torchs_arch_list():
    assert has_kernels((9, 0), ["sm_80", "sm_90"]) and has_kernels((8, 6), ["sm_80"])  # same major, lower minor
    assert not has_kernels((7, 5), ["sm_80", "sm_90"]) and not has_kernels((6, 0), ["sm_70", "sm_80"])
    assert has_kernels((8, 9), ["sm_70", "compute_80"])  # PTX at or below the device


def test_doctor_on_the_cpu_says_so(run):
    code, out = run("doctor", RECIPES_DIR / "kit_fast.yaml", "--device", "cpu")
    assert code == 0, out
    assert "device: the CPU (no CUDA device here)" in out and "precision: fp32" in out
    assert "recipe kit_fast: 2,193,282 parameters" in out and "update: one CUDA graph per update on a GPU" in out
    assert "advice:" not in out


def test_doctor_on_a_stood_in_t4_advises(monkeypatch, quiet):
    _stand_in_gpu(monkeypatch, (7, 5), False, arch=("sm_80", "sm_90"), name="Tesla T4")
    from kit.cli.doctor import doctor
    lines = doctor(str(RECIPES_DIR / "kit_best.yaml"), device="cuda", echo=quiet)
    text = "\n".join(lines)
    assert "device: Tesla T4, compute capability 7.5, 70.0 of 80.0 GiB free" in text
    assert "precision: fp16 (auto: compute capability 7.5 has no native bf16" in text
    assert "update: one CUDA graph per update" in text
    assert "advice: this torch build has no kernels for sm_75" in text


# One run per GPU: seeds and sweep workers pinned to devices (stand-in devices on the CPU).

def test_worker_devices_round_robin():
    from kit.device import worker_devices
    assert worker_devices(("0", "1"), 2) == ["0", "1", "0", "1"] and worker_devices((), 3) == [None, None, None]


def test_seeds_are_separate_runs_each_pinned_to_its_gpu(demo_data, tmp_path, monkeypatch):
    import subprocess

    from kit.training import seeds as seeds_module
    started = []
    real_popen = subprocess.Popen

    def recording_popen(args, env=None, **kwargs):
        started.append((args[args.index("--set", args.index("--device")) + 1:], env.get("CUDA_VISIBLE_DEVICES")))
        return real_popen(args, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(RECIPES_DIR.parent)}, **kwargs)

    monkeypatch.setattr(seeds_module.subprocess, "Popen", recording_popen)
    lines = []
    finished = seeds_module.train_seeds(str(RECIPES_DIR / "demo.yaml"), "demo", [0, 1, 2], devices=("0", "1"),
                                        overrides=("train.epochs=1",), data_root=str(demo_data), runs_dir=str(tmp_path),
                                        device="cpu", echo=lines.append, poll_s=0.1)
    assert [(r.name, r.code) for r in finished] == [("seed 0", 0), ("seed 1", 0), ("seed 2", 0)]
    assert [device for _, device in started] == ["0", "1", finished[2].device] and finished[2].device in ("0", "1")
    assert [r.device for r in finished[:2]] == ["0", "1"]  # two at once, one per GPU; the third waits for a free one
    from kit.recipe import load_recipe
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name.rsplit("-", 2)[0] for p in runs] == ["demo-s0", "demo-s1", "demo-s2"]
    assert [load_recipe(p / "recipe.yaml").train.seed for p in runs] == [0, 1, 2]
    assert lines[0] == f"seed 0 on GPU 0: log {tmp_path / 'demo-s0.log'}"


def test_seeds_from_the_command_line_validate_first(tmp_path, run):
    code, out = run("train", RECIPES_DIR / "demo.yaml", "--seeds", "0,x", "--runs", tmp_path, "--device", "cpu")
    assert code == 2 and "--seeds 0,x: expected comma-separated integers" in out
