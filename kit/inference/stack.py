"""Stacking (`kit blend --stacker logistic`): scikit-learn's LogisticRegression fitted on the members' out-of-fold
probabilities (their logs, one block of K columns per member), and the three ways of mixing members scored the same
way: stacked, greedy-blended (Caruana et al. 2004) and plain-averaged, each measured on images that did not choose
it (an inner stratified k-fold over the labelled images: the stacker and the blend weights are fitted on the other
inner folds; the average chooses nothing)."""

from typing import Callable

import numpy as np
import pandas as pd
import torch

from kit.errors import KitError
from kit.inference.ensemble import ensemble_probs
from kit.inference.scores import probs_loss_acc

INNER_FOLDS = 5  # the inner cross-validation that scores the stacker and the blend (fewer when a class is smaller)
SMALLEST_PROB = 1e-6  # probabilities are clipped here before their log (a member certain of a wrong class)


def stack_features(member_probs: torch.Tensor) -> np.ndarray:
    """(M, N, K) probabilities -> (N, M*K) log-probabilities, the stacker's inputs."""
    logs = np.log(np.clip(member_probs.numpy().astype(np.float64), SMALLEST_PROB, 1))
    return logs.transpose(1, 0, 2).reshape(member_probs.shape[1], -1)


def stacker():
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=2000)  # multinomial (lbfgs), L2 with C=1


def inner_folds(labels: np.ndarray, where: str, seed: int = 0):
    from sklearn.model_selection import StratifiedKFold
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise KitError(f"{where}: a class has one labelled image: too few to cross-validate the stacker")
    return StratifiedKFold(n_splits=min(INNER_FOLDS, smallest), shuffle=True, random_state=seed)


def compare(scored: torch.Tensor, labels: torch.Tensor, choose_weights: Callable, where: str) -> pd.DataFrame:
    """Stacked, blended (weights from `choose_weights(member probs, labels)`: kit.inference.blend's greedy selection)
    and averaged, each with its top-1 and log-loss on the labelled images, measured out of the inner folds that
    fitted it."""
    from sklearn.model_selection import cross_val_predict
    y = labels.numpy()
    folds = inner_folds(y, where)
    stacked = cross_val_predict(stacker(), stack_features(scored), y, cv=folds, method="predict_proba")
    blended = torch.zeros_like(scored[0])
    for choose, held in folds.split(np.zeros(len(y)), y):
        weights = choose_weights(list(scored[:, choose]), labels[choose])
        blended[held] = ensemble_probs(list(scored[:, held]), weights)
    averaged = scored.mean(0)
    rows = [(f"stacked (logistic regression, {folds.n_splits}-fold inner CV)", torch.from_numpy(stacked).float()),
            (f"blended (greedy, {folds.n_splits}-fold inner CV)", blended), ("averaged", averaged)]
    figures = [probs_loss_acc(p, labels) for _, p in rows]
    return pd.DataFrame([{"ensemble": name, "top1": acc, "log_loss": loss} for (name, _), (loss, acc) in zip(rows, figures)])


def fit_and_predict(scored: torch.Tensor, labels: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """The stacker fitted on every labelled image, applied to the members' test probabilities: (N_test, K)."""
    k = scored.shape[2]
    model = stacker().fit(stack_features(scored), labels.numpy())
    probs = np.zeros((test.shape[1], k))
    probs[:, model.classes_] = model.predict_proba(stack_features(test))
    return probs / probs.sum(1, keepdims=True)

