"""Knowledge distillation (Hinton et al., 2015): an ensemble of teacher checkpoints, in eval mode, sees the
student's augmented batch inside the student's update (so inside its CUDA graph), each teacher through its own
checkpoint's normalization; their averaged softmax at temperature T is the soft target. The loss is
(1 - alpha) * label loss + alpha * T^2 * KL(teachers || student at T). Mixup/CutMix need nothing more:
the teachers see the mixed images the student sees, so their targets are mixed the same way."""

import dataclasses
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kit.errors import KitError
from kit.inference.checkpoint import checkpoint_file, load_checkpoint
from kit.recipe import Recipe


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_teachers(recipe: Recipe, source: str) -> Recipe:
    """The recipe with each teacher as an absolute checkpoint file and its sha256 recorded; a resumed run
    checks that its teachers are still the files it started with."""
    spec = recipe.distill
    if not spec.teachers:
        return recipe
    files = [str(checkpoint_file(t).resolve()) for t in spec.teachers]  # a missing one fails here, an unreadable one on loading
    hashes = tuple(file_sha256(f) for f in files)
    if spec.teacher_sha256 and tuple(spec.teacher_sha256) != hashes:
        changed = next(f for f, old, new in zip(files, spec.teacher_sha256, hashes) if old != new)
        raise KitError(f"{changed}: this teacher changed since the run started (sha256 differs from the run's recipe.yaml)")
    return dataclasses.replace(recipe, distill=dataclasses.replace(spec, teachers=tuple(files), teacher_sha256=hashes))


class Teachers(nn.Module):
    """Frozen teacher models; `forward` returns their averaged softmax at the temperature."""

    def __init__(self, models: list[nn.Module], scales: list[torch.Tensor], shifts: list[torch.Tensor], temperature: float):
        super().__init__()
        self.models = nn.ModuleList(models)
        for i, (scale, shift) in enumerate(zip(scales, shifts)):
            self.register_buffer(f"scale{i}", scale.view(1, -1, 1, 1))
            self.register_buffer(f"shift{i}", shift.view(1, -1, 1, 1))
        self.temperature = temperature
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "Teachers":
        return super().train(False)  # always in eval mode: BatchNorm statistics and dropout as trained

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) student-normalized -> (B, K)
        probs = 0
        for i, model in enumerate(self.models):
            own = inputs * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")  # the teacher's normalization
            probs = probs + F.softmax(model(own).float() / self.temperature, dim=1)
        return probs / len(self.models)


def load_teachers(recipe: Recipe, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> Teachers:
    """The recipe's teachers on the device, each converting the student's normalized inputs to its own.
    Built without touching the global random state, so the student's run is the same with or without them."""
    spec = recipe.distill
    models, scales, shifts = [], [], []
    with torch.random.fork_rng(devices=[]):
        for path in spec.teachers:
            teacher = load_checkpoint(path, spec.weights_from, device)
            if len(teacher.classes) != recipe.model.num_classes:
                raise KitError(f"{teacher.path}: a teacher with {len(teacher.classes)} classes cannot teach a student with "
                               f"{recipe.model.num_classes} (model.num_classes)")
            taught, own = recipe.data.image_shape, teacher.recipe.data.image_shape
            if own != taught:
                raise KitError(f"{teacher.path}: a teacher of {own[1]}x{own[1]} images with {own[0]} channel(s) cannot teach a "
                               f"student of {taught[1]}x{taught[1]} with {taught[0]} (data.image_size, data.channels)")
            t_mean, t_std = teacher.mean.to(device), teacher.std.to(device)
            models.append(teacher.model)
            scales.append(std / t_std)
            shifts.append((mean - t_mean) / t_std)
    return Teachers(models, scales, shifts, spec.temperature).to(device)


def soft_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student at T), averaged over the batch (Hinton et al.: T^2 keeps gradients at scale)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature ** 2


class DistillLoss(nn.Module):
    """ForwardLoss with teachers: the label loss and the soft loss blended by alpha; returns (loss, correct)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, teachers: Teachers, alpha: float):
        super().__init__()
        self.model, self.loss_fn, self.teachers, self.alpha = model, loss_fn, teachers, alpha

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor):
        logits = self.model(inputs)
        correct = (logits.detach().argmax(1) == labels).sum()
        soft = soft_loss(logits, self.teachers(inputs), self.teachers.temperature)
        return (1 - self.alpha) * self.loss_fn(logits, targets) + self.alpha * soft, correct
