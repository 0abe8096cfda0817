"""`kit evaluate`: accuracy of each member and of the ensemble on labelled data, with and without
TTA; `--select` runs greedy ensemble selection with replacement (Caruana et al., 2004)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from kit.data import Split, load_dataset
from kit.engine import Precision
from kit.errors import KitError
from kit.io import write_text
from kit.members import Member, ensemble_probs, load_members
from kit.session import resolve_device
from kit.tta import tta_views


def held_out(members: list[Member], data_root: str | None, split: str) -> Split:
    """The labelled images every member is scored on; they must agree on it."""
    chosen, first, loaded = None, None, {}
    for m in members:
        if m.recipe.data not in loaded:  # members of one recipe family share their data: read it once
            loaded[m.recipe.data] = load_dataset(m.recipe.data, data_root, split).val
        data = loaded[m.recipe.data]
        if chosen is None:
            chosen, first = data, m
        elif len(data) != len(chosen) or not torch.equal(data.labels, chosen.labels) or not torch.equal(data.images, chosen.images):
            raise KitError(f"{m.path}: validates on other images than {first.path} (a split vs the test_batch?); "
                           f"use --split test to score all of them on the test_batch")
    return chosen


def topk(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k most probable classes."""
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def greedy_selection(probs: list[torch.Tensor], labels: torch.Tensor, rounds: int) -> list[float]:
    """Caruana et al. (2004): repeatedly add (with replacement) the member that most improves the
    ensemble's accuracy (ties: lower log-loss); keep the best prefix. Returns one weight per member."""
    counts, best_counts, best_score = [0] * len(probs), None, None
    total = torch.zeros_like(probs[0])
    for _ in range(rounds):
        n = sum(counts) + 1
        scores = []
        for p in probs:
            mix = (total + p) / n
            nll = torch.nn.functional.nll_loss(mix.clamp_min(1e-12).log(), labels).item()
            scores.append(((mix.argmax(1) == labels).float().mean().item(), -nll))
        pick = max(range(len(probs)), key=lambda i: scores[i])
        counts[pick] += 1
        total += probs[pick]
        if best_score is None or scores[pick] > best_score:
            best_score, best_counts = scores[pick], list(counts)
    return [c / sum(best_counts) for c in best_counts]


@dataclass
class Scored:
    plain: list[torch.Tensor]  # per member, no TTA
    tta: list[torch.Tensor]  # per member, with TTA


def score_members(members: list[Member], data: Split, views: list, batch_size: int, prec: Precision) -> Scored:
    plain = [m.probs(data.images, tta_views("none"), batch_size, prec) for m in members]
    tta = [m.probs(data.images, views, batch_size, prec) for m in members] if len(views) > 1 else plain
    return Scored(plain, tta)


def _row(name: str, params: int, plain: torch.Tensor, tta: torch.Tensor, labels: torch.Tensor, top5: bool) -> dict:
    row = {"member": name, "parameters": params, "top1": topk(plain, labels, 1), "top1_tta": topk(tta, labels, 1)}
    if top5:
        row.update(top5=topk(plain, labels, 5), top5_tta=topk(tta, labels, 5))
    return row


def evaluate(paths: list[str], data_root: str | None = None, split: str = "val", tta: str | None = None, select: bool = False,
             rounds: int = 20, weights_from: str = "best", csv_out: str | None = None, select_out: str | None = None,
             batch_size: int = 1000, device: str = "auto", echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Print and write the accuracy table; with `select`, also the chosen weights (and a selection file)."""
    dev = resolve_device(device)
    members = load_members(paths, weights_from, dev)
    data = held_out(members, data_root, split)
    tta = tta or members[0].recipe.predict.tta
    prec = Precision(dev, torch.bfloat16 if dev.type == "cuda" else None)
    scored = score_members(members, data, tta_views(tta), batch_size, prec)
    labels, top5 = data.labels, len(members[0].classes) > 10
    rows = [_row(m.name, m.num_params, p, t, labels, top5) for m, p, t in zip(members, scored.plain, scored.tta)]
    total = sum(m.num_params for m in members)
    rows.append(_row("ensemble (mean)", total, ensemble_probs(scored.plain), ensemble_probs(scored.tta), labels, top5))
    if select:
        weights = greedy_selection(scored.tta, labels, rounds)
        used = sum(m.num_params for m, w in zip(members, weights) if w > 0)
        rows.append(_row("ensemble (selected)", used, ensemble_probs(scored.plain, weights), ensemble_probs(scored.tta, weights), labels, top5))
        echo("selected: " + ", ".join(f"{m.name} {w:.3f}" for m, w in zip(members, weights) if w > 0))
        if select_out:
            selection = {"weights": {str(Path(p).resolve()): w for p, w in zip(paths, weights) if w > 0},
                         "tta": tta, "split": split, "top1_tta": rows[-1]["top1_tta"]}
            write_text(select_out, json.dumps(selection, indent=2))
            echo(f"selection: {select_out} (use: kit predict {' '.join(paths)} --weights {select_out} --tta {tta})")
    table = pd.DataFrame(rows)
    echo(f"{split} set: {len(labels):,} labelled images, tta {tta}")
    echo(table.to_string(index=False, formatters={c: "{:.2%}".format for c in table.columns if c.startswith("top")}))
    if csv_out:
        write_text(csv_out, table.to_csv(index=False))
        echo(f"table: {csv_out}")
    return table
