"""The `kit` command line: parse, load, call one function. Errors become one line and exit code 2."""

import os
import sys
from pathlib import Path

import click

from kit import __version__
from kit.cli.options import (
    KitGroup,
    adapt_options,
    argument_type,
    batch_size_option,
    checkpoints_argument,
    class_list,
    device_option,
    devices_option,
    held_out_option,
    precision_option,
    rounds_option,
    select_on_option,
    set_option,
    submission_format,
    submission_options,
    tta_option,
    weights_from_option,
    with_options,
)
from kit.errors import KitError
from kit.recipe import (
    DATA_FORMATS,
    LR_FIND_UPDATES,
    RECIPES_DIR,
    REPORT_MISTAKES,
    SWEEP_DB_WAIT_S,
    SWEEP_GRACE_BEATS,
    SWEEP_HEARTBEAT_S,
    SWEEP_MAX_RETRIES,
)


@click.group(cls=KitGroup)
@click.version_option(__version__, prog_name="kit")
def cli():
    """Recipes, fast training, ensembles with TTA and reports for CIFAR-style competitions."""


def recipe_files() -> list[Path]:
    """Every recipe in the repository's recipes/ (what `kit recipes` lists)."""
    return sorted(RECIPES_DIR.glob("*.yaml"))


def _recipe_files(paths: tuple[str, ...]) -> list[Path]:
    return [Path(p) for p in paths] if paths else recipe_files()


@cli.command("recipes")
@click.argument("paths", nargs=-1)
def recipes_cmd(paths):
    """Table of recipes (default: every file in recipes/): model, exact parameters, budget, paper accuracy."""
    from kit.models.summary import recipes_table
    click.echo(recipes_table(_recipe_files(paths)))


@cli.command("params")
@click.argument("recipe")
@set_option
def params_cmd(recipe, overrides):
    """Per-stage parameter breakdown and total of a recipe's model."""
    from kit.models.summary import params_table
    click.echo(params_table(recipe, overrides))


@cli.command("train")
@click.argument("recipe", required=False)
@set_option
@click.option("--resume", "resume_dir", metavar="RUN_DIR",
              help="Continue this run from its last.pt (a CV directory: its fold in progress, then the rest).")
@click.option("--data-root", metavar="DIR", help="Folder holding cifar-10-batches-py/ (or cifar-100-python/).")
@click.option("--runs", "out_root", default="runs", show_default=True, help="Runs are created under this folder.")
@click.option("--run-name", metavar="NAME", help="A fixed run directory, RUNS/NAME, that the same command continues from "
                                                 "its last.pt when it has one (what torchrun --max-restarts needs).")
@click.option("--log", type=click.Choice(["none", "tensorboard"]), help="Epoch logging (same as --set train.log=...).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine, one per GPU (on the CPU: gloo processes); starts torchrun for you.")
@click.option("--seeds", metavar="S1,S2,...", help="Train one run per seed instead (RECIPE-sS), spread over --devices.")
@click.option("--folds", type=argument_type("folds"),
              help="k-fold cross-validation: one run per fold into runs/<recipe>-cv-<time>/ (oof.probs.npz, cv.csv).")
@click.option("--pseudo", metavar="TEST.probs.npz",
              help="Pseudo-labels: add the unlabelled test images this probability file is of (same as --set pseudo.probs=...).")
@click.option("--pseudo-threshold", metavar="P", help="With --pseudo: the least probability of the predicted class "
                                                      "(default 0.9; --set pseudo.threshold=...).")
@click.option("--pseudo-soft", is_flag=True, help="With --pseudo: train on the probabilities, not on the predicted class.")
@devices_option
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --seeds or --folds: runs at once per device.")
@device_option
def train_cmd(recipe, overrides, resume_dir, data_root, out_root, run_name, log, gpus, seeds, folds, pseudo, pseudo_threshold,
              pseudo_soft, devices, jobs, device):
    """Train RECIPE into runs/<recipe>-<time>/, or continue one with --resume RUN_DIR (also on another device).
    Under torchrun (or with --gpus N) every process trains its slice of each batch; rank 0 writes."""
    from kit.recipe import load_recipe
    from kit.training import distributed
    from kit.training.run import resume, train
    if bool(recipe) == bool(resume_dir):
        raise KitError("give either RECIPE or --resume RUN_DIR")
    overrides = (*overrides, *((f"train.log={log}",) if log else ()), *pseudo_overrides(pseudo, pseudo_threshold, pseudo_soft))
    if recipe and data_root:
        overrides = (*overrides, *recognized_overrides(recipe, overrides, data_root))
    from kit.inference.checkpoint import is_cv_dir
    if folds or (resume_dir and is_cv_dir(resume_dir)):
        _train_cv(recipe, folds, resume_dir, overrides, data_root, out_root, devices, jobs, device, gpus, seeds)
        return
    if seeds:
        _train_seeds(recipe, seeds, devices, jobs, overrides, data_root, out_root, device, gpus)
        return
    if gpus > 1 and "LOCAL_RANK" not in os.environ:  # this very command again, one process per GPU, under torchrun
        sys.exit(distributed.launch(gpus, _without_gpus(click.get_current_context())))
    if distributed.max_restarts() and not (run_name or resume_dir):
        raise KitError(f"torchrun --max-restarts {distributed.max_restarts()} starts this command again after a failure: "
                       "give --run-name NAME so that it continues the same run")
    named = Path(out_root) / run_name if run_name else None
    if named is not None and (named / "last.pt").is_file():  # a restarted torchrun group: every rank sees the same file
        resume_dir = named
    with distributed.process_group():  # kit train -> train/resume -> Run.fit (the run's loop) -> Trainer.update
        if resume_dir:
            run = resume(resume_dir, overrides=overrides if not named else (), data_root=data_root, device=device)
        else:
            run = train(load_recipe(recipe, overrides), data_root=data_root, out_root=out_root, device=device, run_dir=named)
    _print_run(run)


def recognized_overrides(recipe: str, overrides: tuple[str, ...], data_root: str | None) -> tuple[str, ...]:
    """Where the recipe sets no data keys and --data-root holds another layout than CIFAR's: the data keys the folder
    says (kit.data.inspect), printed, as overrides; else none."""
    from kit.data.inspect import recognized
    from kit.recipe import load_recipe
    _, found = recognized(load_recipe(recipe, overrides).data, data_root)
    if found is None:
        return ()
    click.echo(found.describe())
    return tuple(found.overrides())


def pseudo_overrides(probs: str | None, threshold: str | None, soft: bool) -> tuple[str, ...]:
    """--pseudo, --pseudo-threshold and --pseudo-soft as the recipe keys they set (the recipe checks them)."""
    if (threshold is not None or soft) and not probs:
        raise KitError("--pseudo-threshold and --pseudo-soft go with --pseudo TEST.probs.npz")
    if not probs:
        return ()
    return (f"pseudo.probs={Path(probs).resolve()}", *((f"pseudo.threshold={threshold}",) if threshold is not None else ()),
            *(("pseudo.soft=true",) if soft else ()))


def _train_cv(recipe, folds, resume_dir, overrides, data_root, out_root, devices, jobs, device, gpus, seeds) -> None:
    from kit.recipe import load_recipe
    from kit.training.cv import run_cv, train_cv
    if gpus > 1 or seeds:
        raise KitError("--folds trains one process per fold: use --devices to spread them, not --gpus or --seeds")
    if resume_dir:
        if folds or overrides:
            raise KitError(f"{resume_dir}: a CV directory resumes as it was planned (no --folds, --set or --pseudo)")
        cv_dir = run_cv(resume_dir, data_root, device, devices, jobs, echo=click.echo)
    else:
        cv_dir = train_cv(load_recipe(recipe, overrides), folds, data_root, out_root, device, devices, jobs, echo=click.echo)
    click.echo(f"cv: {cv_dir}")


def _train_seeds(recipe, seeds, devices, jobs, overrides, data_root, out_root, device, gpus) -> None:
    from kit.recipe import load_recipe
    from kit.training.seeds import train_seeds
    if gpus > 1:
        raise KitError("--seeds trains one process per run: use --devices to spread them, not --gpus")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise KitError(f"--seeds {seeds}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    name = load_recipe(recipe, overrides).name  # validated once here, before any process starts
    finished = train_seeds(recipe, name, seed_list, devices, jobs, overrides, data_root, out_root, device, echo=click.echo)
    failed = [job.name for job in finished if job.code != 0]
    if failed:
        raise KitError(f"{', '.join(failed)} failed: see their logs in {out_root}")


def _without_gpus(ctx: click.Context) -> list[str]:
    """This command's own arguments (`train ...`) without --gpus N, to run again under torchrun."""
    args, skip = [], False
    for arg in ctx.meta["argv"]:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            args.append(arg)
    return args


def _print_run(run) -> None:
    """The run directory, printed once (by rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"run: {run}")


@cli.command("distill")
@click.argument("recipe")
@click.option("--teacher", "teachers", multiple=True, required=True, metavar="CHECKPOINT",
              help="A teacher: run directory or checkpoint file (repeatable; their softmax is averaged).")
@set_option
@click.option("--data-root", metavar="DIR")
@click.option("--runs", "out_root", default="runs", show_default=True, help="Runs are created under this folder.")
@device_option
def distill_cmd(recipe, teachers, overrides, data_root, out_root, device):
    """Train the student RECIPE on the teachers' averaged soft targets (recipe section distill:, short form)."""
    import yaml

    from kit.recipe import load_recipe
    from kit.training import distributed
    from kit.training.run import train
    listed = yaml.safe_dump([str(t) for t in teachers], default_flow_style=True).strip()
    student = load_recipe(recipe, (f"distill.teachers={listed}",) + tuple(overrides))
    with distributed.process_group():
        run = train(student, data_root=data_root, out_root=out_root, device=device)
    _print_run(run)


@cli.command("sweep")
@click.argument("recipe")
@set_option
@click.option("--grid", multiple=True, metavar="KEY=V1,V2", help="Values of one recipe key; the sweep is the product of the grids.")
@click.option("--space", metavar="YAML", help="Ranges and choices for Optuna's TPE: KEY: {low, high, log} or {choices: [...]}.")
@click.option("--trials", type=int, help="Trials for --space.")
@click.option("--name", help="The sweep folder's name (default: the recipe's).")
@click.option("--sweeps", "out_root", default="sweeps", show_default=True, help="Sweep folders go here.")
@click.option("--study", "study_name", help="Optuna study name (default: the sweep's name).")
@click.option("--storage", metavar="URL", help="Database URL or journal file shared by workers (default: SQLite in the sweep folder).")
@click.option("--jobs", default=1, show_default=True, help="Trials trained at once by this command (per GPU with --devices).")
@click.option("--no-prune", is_flag=True, help="Train every trial to the end.")
@click.option("--prune-startup", default=4, show_default=True, help="Trials that finish before the median pruner acts.")
@click.option("--data-root", metavar="DIR")
@click.option("--heartbeat", type=argument_type("heartbeat"), default=SWEEP_HEARTBEAT_S, show_default=True,
              help=f"Seconds between a trial's heartbeats in a database; a worker silent for {SWEEP_GRACE_BEATS} of them "
                   f"is dead, and its trial is queued again (at most {SWEEP_MAX_RETRIES} times).")
@click.option("--db-wait", type=argument_type("db_wait"), default=SWEEP_DB_WAIT_S, show_default=True,
              help="Seconds a worker waits for a database that stopped answering before it stops.")
@devices_option
@device_option
def sweep_cmd(recipe, overrides, grid, space, trials, name, out_root, study_name, storage, jobs, no_prune, prune_startup,
              data_root, heartbeat, db_wait, devices, device):
    """Train RECIPE's variants as Optuna trials; write sweeps/<name>/results.csv, results.md and curves.png.
    The same command continues an interrupted sweep."""
    import optuna

    from kit.sweep import sweep
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep(recipe, overrides=tuple(overrides), grid=tuple(grid), space=space, trials=trials, name=name, out_root=out_root,
          study_name=study_name, storage=storage, jobs=jobs, prune=not no_prune, prune_startup=prune_startup,
          data_root=data_root, device=device, devices=devices, heartbeat_s=heartbeat, db_wait_s=db_wait)


@cli.group("data")
def data_cmd():
    """Data folders: the embedded demo, a download, or what a folder holds (inspect)."""


@data_cmd.command("demo")
@click.argument("out_dir")
@click.option("--format", "fmt", type=click.Choice(DATA_FORMATS), default="cifar", show_default=True,
              help="The layout: CIFAR pickles, a folder per class (64x64), Kaggle CIFAR-10's CSV + PNGs, Digit Recognizer's "
                   "pixel CSV (28x28 gray), or MedMNIST's .npz.")
def data_demo_cmd(out_dir, fmt):
    """scikit-learn's digits in a competition's layout, with its unlabelled test set, sample submission, the answers
    (test_labels.csv) and recipe.yaml (the demo recipe reading it)."""
    from kit.data.demo import make_demo_format
    out = make_demo_format(out_dir, fmt)
    click.echo(f"demo data: {out} (format {fmt}); train it: kit train {out / 'recipe.yaml'}")


@data_cmd.command("inspect")
@click.argument("root", metavar="DIR")
def data_inspect_cmd(root):
    """What DIR holds: the layout (CIFAR pickles, class folders, a labels CSV and images, a pixels CSV, an .npz), image
    size and channels, the labelled and unlabelled test sets, and the recipe's data keys for it."""
    from kit.data.inspect import inspect
    found = inspect(root)
    for line in found.what:
        click.echo(line)
    click.echo("recipe keys: " + " ".join(found.overrides()))
    click.echo(f"use: kit train RECIPE --data-root {root}" + "".join(f" --set {o}" for o in found.overrides())
               + " (or give no data keys: kit train reads them from the folder)")


@data_cmd.command("download")
@click.argument("dataset", type=click.Choice(["cifar10", "cifar100"]))
@click.argument("out_dir")
def data_download_cmd(dataset, out_dir):
    """torchvision's download of CIFAR-10/100 (needs internet)."""
    from kit.data.datasets import download_cifar
    click.echo(f"downloaded: {download_cifar(dataset, out_dir)}")


@cli.command("bench")
@click.argument("recipe")
@set_option
@click.option("--updates", "timed", type=click.IntRange(min=1), default=50, show_default=True, help="Timed updates per loop.")
@click.option("--untimed", default=10, show_default=True, help="Untimed updates first (compilation, graph capture).")
@click.option("--batch-size", type=argument_type("batch_size"), help="Measure both loops at this batch size instead of the recipe's.")
@click.option("--data-root", metavar="DIR", help="Real data (default: random images of the same size).")
@click.option("--precision", type=argument_type("precision"),
              help="The kit engine's precision (default: the recipe's train.precision).")
@device_option
def bench_cmd(recipe, overrides, timed, untimed, batch_size, data_root, precision, device):
    """Training images/s of the kit engine vs a seed-style DataLoader loop and their ratio, the eager update's
    breakdown (augmentation, forward + backward, optimizer + EMA) and the model's floor (FLOPs, activation bytes)."""
    from kit.recipe import load_recipe
    from kit.training.bench import bench
    overrides = tuple(overrides) + ((f"train.precision={precision}",) if precision else ())
    bench(load_recipe(recipe, overrides), updates=timed, batch_size=batch_size, data_root=data_root, device=device,
          untimed=untimed)


@cli.command("lr-find")
@click.argument("recipe")
@set_option
@click.option("--data-root", metavar="DIR", help="Default: the recipe's data.root.")
@click.option("--updates", type=argument_type("updates"), default=LR_FIND_UPDATES, show_default=True,
              help="Updates the sweep is planned for.")
@click.option("--start-lr", type=argument_type("start_lr"), default=1e-7, show_default=True)
@click.option("--end-lr", type=argument_type("end_lr"), default=10.0, show_default=True)
@click.option("--diverge", type=argument_type("diverge"), default=4.0, show_default=True,
              help="Stop once the running average of the loss passes this x its lowest.")
@click.option("--rule", type=argument_type("rule"), default="minimum", show_default=True,
              help="minimum: the LR of the lowest smoothed loss / 10; steep: where the smoothed loss falls fastest.")
@click.option("--out", metavar="PNG", help="The plot.  [default: lr_find/<recipe>.png]")
@device_option
def lr_find_cmd(recipe, overrides, data_root, updates, start_lr, end_lr, diverge, rule, out, device):
    """An LR range test of RECIPE (the engine's own update, the recipe's model, data, augmentation and optimizer): the
    loss against an exponentially rising LR as a PNG, and the suggested optim.lr."""
    from kit import api
    from kit.recipe import load_recipe
    found = api.lr_find(load_recipe(recipe, overrides), data_root, device, updates, start_lr, end_lr, diverge, echo=click.echo)
    for line in found.describe(rule):
        click.echo(line)
    plot = Path(out or Path("lr_find") / f"{found.recipe}.png")
    found.plot(plot)
    click.echo(f"plot: {plot}")


@cli.command("predict")
@checkpoints_argument
@click.option("--test", "test_path", required=True, metavar="PATH",
              help="Unlabelled test set: the competition's pickle {b'data', b'ids'}, a folder of images, a pixels CSV or a .npz.")
@tta_option
@click.option("--blend", metavar="W", help="Comma-separated ensemble weights, or a selection file from kit evaluate --select.")
@weights_from_option
@click.option("--out", metavar="CSV", help="Default: submissions/<recipe>.csv (one checkpoint) or submissions/ensemble.csv.")
@with_options(submission_options)
@batch_size_option
@with_options(adapt_options)
@precision_option
@device_option
def predict_cmd(checkpoints, test_path, tta, blend, weights_from, out, template, labels, id_column, label_column, batch_size,
                adapt_bn, adapt_prior, precision, device):
    """Ensemble CHECKPOINTS (run directories, .pt/.safetensors files, sweep folders) with TTA on a test set; write the
    submission CSV (the template's format, or ID,Labels) and its probabilities (CSV.probs.npz, for kit blend)."""
    from kit.inference.predict import predict
    fmt = submission_format(template, labels, id_column, label_column)
    predict(list(checkpoints), test_path, tta=tta, blend=blend, weights_from=weights_from, out=out, batch_size=batch_size,
            device=device, adapt_bn=adapt_bn, adapt_prior=adapt_prior, precision=precision, template=template, fmt=fmt,
            echo=click.echo)


@cli.command("blend")
@click.option("--labelled", multiple=True, required=True, metavar="NPZ",
              help="Probabilities on labelled images (kit evaluate --probs-out), one file per model or ensemble (repeatable).")
@click.option("--unlabelled", multiple=True, required=True, metavar="NPZ",
              help="The same models' probabilities on the test set (kit predict writes CSV.probs.npz), in the same order.")
@click.option("--out", required=True, metavar="CSV", help="The submission CSV (its .probs.npz goes beside it).")
@rounds_option
@select_on_option(0.5)
@with_options(submission_options)
@click.option("--classes", metavar="A,B,...", help="The class names, when the probability files carry none (a names template needs them).")
@click.option("--stacker", type=argument_type("stacker"), help="Stack instead: fit this model on the labelled files "
              "(out-of-fold ones: a CV directory's oof.probs.npz) and print it beside the blend and the plain average.")
def blend_cmd(labelled, unlabelled, out, rounds, select_on, template, labels, id_column, label_column, classes, stacker):
    """An ensemble from saved probabilities alone: greedy selection on the labelled files, submission from the
    unlabelled ones (no checkpoint, no GPU; seconds). Other software's .npz (probs (N, K), ids, labels) blends too."""
    from kit import api
    fmt = submission_format(template, labels, id_column, label_column)
    api.blend(list(labelled), list(unlabelled), out, rounds=rounds, select_on=select_on, template=template, fmt=fmt,
              given_classes=class_list(classes), stacker=stacker, echo=click.echo)


@cli.command("evaluate")
@checkpoints_argument
@click.option("--data-root", metavar="DIR", help="Default: each run's recorded data root.")
@held_out_option
@tta_option
@click.option("--select", is_flag=True, help="Greedy ensemble selection with replacement (Caruana et al., 2004).")
@rounds_option
@select_on_option(1.0)
@click.option("--select-out", metavar="JSON", help="Write the selected blend here, for kit predict --blend.")
@click.option("--csv", "csv_out", metavar="CSV", help="Write the table here too.")
@click.option("--probs-out", metavar="NPZ", help="Write each checkpoint's probabilities and the labels here, for kit blend.")
@weights_from_option
@batch_size_option
@with_options(adapt_options)
@click.option("--corrupt", is_flag=True, help="Robustness instead: accuracy under 7 generated corruptions x severities 1-5, "
                                              "with and without --adapt-bn, and whether adaptation helps.")
@click.option("--plot", "plot_out", metavar="PNG", help="With --corrupt: the plot, one panel per corruption.")
@precision_option
@device_option
def evaluate_cmd(checkpoints, data_root, held_out, tta, select, rounds, select_on, select_out, csv_out, probs_out, weights_from,
                 batch_size, adapt_bn, adapt_prior, corrupt, plot_out, precision, device):
    """Top-1 (and top-5 for 100 classes) of each checkpoint and the ensemble, with and without TTA."""
    if corrupt:
        from kit.inference.robustness import robustness
        robustness(list(checkpoints), data_root=data_root, held_out=held_out, tta=tta or "none", weights_from=weights_from,
                   prior=adapt_prior, batch_size=batch_size, device=device, csv_out=csv_out, plot_out=plot_out,
                   precision=precision)
        return
    from kit import api
    api.evaluate(list(checkpoints), data_root=data_root, held_out=held_out, tta=tta, select=select, rounds=rounds,
                 weights_from=weights_from, csv_out=csv_out, select_out=select_out, batch_size=batch_size, device=device,
                 select_on=select_on, adapt_bn=adapt_bn, adapt_prior=adapt_prior, precision=precision, probs_out=probs_out)


@cli.command("export")
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "onnx", "torchscript"]), required=True)
@weights_from_option
@click.option("--out", metavar="FILE", help="Default: beside the checkpoint file, with the format's extension "
                                            "(a CV directory: a folder for its fold models).")
def export_cmd(checkpoint, fmt, weights_from, out):
    """Export CHECKPOINT's weights: safetensors (a predict/evaluate checkpoint again), ONNX or TorchScript."""
    from kit.inference.export import export
    export(checkpoint, fmt, weights_from=weights_from, out=out)


@cli.command("check-submission")
@click.argument("csv_path", metavar="CSV")
@click.option("--test", "test_path", metavar="PATH", help="The unlabelled test set (pickle, image folder, pixels CSV, .npz).")
@with_options(submission_options)
@click.option("--num-classes", default=10, show_default=True, help="For class indices.")
@click.option("--classes", metavar="A,B,...", help="The class names, for names and probability columns.")
@click.option("--checkpoint", metavar="RUN", help="Take the class names from this run directory or checkpoint.")
def check_submission_cmd(csv_path, test_path, template, labels, id_column, label_column, num_classes, classes, checkpoint):
    """Header, one row per test id (the template's, or --test's), no duplicates, labels valid for the style; exit 2
    with the first problem."""
    from kit.inference.checkpoint import read_payload
    from kit.inference.submission import check_submission, format_from_template
    if not test_path and not template:
        raise KitError("give --test PATH, --template CSV, or both: the ids the submission must have")
    if classes and checkpoint:
        raise KitError("give --classes or --checkpoint, not both: either names the classes")
    names = class_list(classes) or ([str(c) for c in read_payload(checkpoint)["classes"]] if checkpoint else None)
    fmt = format_from_template(template, names) if template else submission_format(None, labels, id_column, label_column)
    rows = check_submission(csv_path, test_path, fmt, num_classes, names)
    click.echo(f"ok: {csv_path} has one valid row for each of the {rows:,} test ids")
    if fmt.style == "name" and names is None:
        click.echo("note: the class names were not checked against the classes (only that none is empty): give --classes "
                   "or --checkpoint")


@cli.command("report")
@checkpoints_argument
@click.option("--data-root", metavar="DIR", help="Default: each run's recorded data root.")
@click.option("--report-dir", metavar="DIR", help="Write DIR/<run>/ (default: RUN/report/).")
@held_out_option
@tta_option
@click.option("--mistakes", type=argument_type("mistakes"), default=REPORT_MISTAKES, show_default=True,
              help="How many of the worst mistakes (and most-disagreed test images) to show.")
@click.option("--test", "test_path", metavar="PATH",
              help="An unlabelled test set: with several checkpoints, the images their members disagree on most.")
@precision_option
@device_option
def report_cmd(checkpoints, data_root, report_dir, held_out, tta, mistakes, test_path, precision, device):
    """Per-class precision/recall/F1, confusion matrix, confused pairs, the worst mistakes and the most-confused pairs as
    pictures, curves and REPORT.md per checkpoint; with --test, where an ensemble's members disagree."""
    from kit import api
    api.report(list(checkpoints), data_root=data_root, report_dir=report_dir, held_out=held_out, tta=tta, device=device,
               precision=precision, mistakes=mistakes, test=test_path)


@cli.command("pack")
@checkpoints_argument
@click.option("--test", "test_path", required=True, metavar="PATH",
              help="The test set's path in the competition's notebook, e.g. /kaggle/input/<competition>/test.pkl.")
@click.option("--out", required=True, metavar="DIR", help="A new folder: kit-wheels/, kit-checkpoints/, inference.py, .ipynb.")
@click.option("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}", show_default=True,
              help="The image's Python version (the wheels are downloaded for it).")
@click.option("--platform", default="manylinux2014_x86_64", show_default=True, help="The image's platform tag.")
@click.option("--image-has", metavar="A,B,...", help="Packages the image already has (default: torch, torchvision, triton, "
                                                     "nvidia-*); the other dependencies of kit are packed.")
@click.option("--kaggle-user", default="your-kaggle-username", show_default=True, help="For dataset-metadata.json.")
@tta_option
def pack_cmd(checkpoints, test_path, out, python, image_has, platform, kaggle_user, tta):
    """A folder to upload as Kaggle datasets for a code competition (internet off): a wheelhouse of kit and what the
    image lacks, the checkpoints as safetensors, and an inference script and notebook that install with --no-index."""
    from kit.cli.pack import IMAGE_HAS, pack
    has = tuple(p.strip() for p in image_has.split(",") if p.strip()) if image_has else IMAGE_HAS
    pack(list(checkpoints), out, test_path, python, platform, has, kaggle_user, tta, echo=click.echo)


@cli.command("runs")
@click.argument("runs_dir", default="runs", required=False)
@click.option("--csv", "csv_out", metavar="CSV", help="Write the table here too.")
def runs_cmd(runs_dir, csv_out):
    """One table of every run below RUNS_DIR (default runs/; a CV's folds and a sweep's trials too), best first: recipe,
    what differs from its recipe file, parameters, epochs, best and last validation accuracy, time, precision, device."""
    import pandas as pd

    from kit import api
    from kit.io import write_text
    table = api.runs(runs_dir)
    if table.empty:
        click.echo(f"{runs_dir}: no run directory (recipe.yaml and metrics.csv) below it")
        return
    shown = table.assign(**{c: table[c].map(lambda v: "-" if pd.isna(v) else f"{v:.2%}")
                            for c in ("best_val_acc", "last_val_acc", "last_ema_val_acc")},
                         minutes=table.minutes.map("{:.1f}".format),
                         parameters=table.parameters.map(lambda v: "-" if pd.isna(v) else f"{int(v):,}"),
                         differs=table.differs.map(lambda v: v if len(v) <= 60 else v[:57] + "..."))
    click.echo(shown.fillna("-").to_string(index=False))
    if csv_out:
        write_text(csv_out, table.to_csv(index=False))
        click.echo(f"table: {csv_out}")


@cli.command("doctor")
@click.argument("recipe", required=False)
@device_option
def doctor_cmd(recipe, device):
    """What kit will do on this machine: device, capability, torch/CUDA and kernels, precision, whether RECIPE's
    update is one CUDA graph, free memory, optional packages, and advice where they disagree."""
    from kit.cli.doctor import doctor
    doctor(recipe, device=device)


@cli.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, help="Demo data and runs go here.")
@click.option("--out", "submission", default="submissions/demo.csv", show_default=True, help="The submission CSV.")
@device_option
def demo_cmd(workdir, submission, device):
    """The main job on the embedded digits data: data, 2 training runs, ensemble + TTA CSV, report, accuracy."""
    from kit.cli.demo import demo
    recipe = RECIPES_DIR / "demo.yaml"
    if not recipe.is_file():
        raise KitError(f"{recipe}: the demo recipe is missing (install kit from its repository: pip install -e .)")
    demo(recipe, workdir=workdir, submission=submission, device=device)


def main():
    cli(prog_name="kit")


if __name__ == "__main__":
    main()
