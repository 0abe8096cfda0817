"""What the `kit` commands share: the group that turns errors into one line, and the options several commands take."""

import sys

import click

from kit.errors import KitError
from kit.faults import Stopped
from kit.recipe import ARGUMENTS, OLD_WEIGHTS_FROM, check_argument


class KitGroup(click.Group):
    """Turns KitError and OS errors (an unwritable output path, a full disk) into `error: ...` on stderr,
    exit 2, no traceback; a run stopped by SIGTERM/SIGINT says how to resume and exits 143/130. Keeps the command's
    own arguments (`ctx.meta["argv"]`) for `kit train --gpus N`."""

    def parse_args(self, ctx, args):
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            click.echo(f"error: {where}{err.strerror or err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: the last completed epoch's checkpoint is kept (kit train --resume RUN)", err=True)
            sys.exit(130)
        except Stopped as err:  # a run saved its position on SIGTERM/SIGINT
            click.echo(str(err), err=True)
            sys.exit(err.exit_code)


class Checked(click.ParamType):
    """A number flag read by its rule in kit.recipe.ARGUMENTS (the API's rule too): a bad value is one line, exit 2."""

    def __init__(self, name: str):
        self.argument = name
        self.name = ARGUMENTS[name].kind.__name__

    def convert(self, value, param, ctx):
        arg = ARGUMENTS[self.argument]
        if isinstance(value, str):
            try:
                value = arg.kind(value.strip())
            except ValueError:
                raise KitError(f"{arg.flag} {value!r}: expected a {'whole ' if arg.kind is int else ''}number "
                               f"({arg.describe()})") from None
        return check_argument(self.argument, value, arg.flag)

    def get_metavar(self, param, ctx=None) -> str:
        return f"{self.name.upper()} ({ARGUMENTS[self.argument].describe()})"


def argument_type(name: str) -> click.ParamType:
    """The click type of an ARGUMENTS entry: its choices, or its checked number."""
    arg = ARGUMENTS[name]
    return click.Choice(arg.choices) if arg.choices else Checked(name)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe field, e.g. --set optim.lr=0.05 (repeatable).")
tta_option = click.option("--tta", type=argument_type("tta"),
                          help="Test-time augmentation views (default: the first run's recipe, predict.tta).")
device_option = click.option("--device", type=argument_type("device"), default="auto", show_default=True)


def device_list(ctx, param, value) -> tuple[str, ...]:
    return tuple(d.strip() for d in value.split(",") if d.strip()) if value else ()


devices_option = click.option("--devices", callback=device_list, metavar="I,J,...",
                              help="GPUs to spread the processes over (CUDA indices), each process pinned to one.")
precision_option = click.option("--precision", type=argument_type("precision"), default="auto",
                                show_default=True, help="auto: bf16 where the GPU runs it natively, fp16 on compute "
                                                        "capability 7.x (T4, V100), fp32 below and on the CPU.")


weights_from_option = click.option("--weights-from", type=argument_type("weights_from"), default="better",
                                   show_default=True, callback=lambda ctx, param, value: OLD_WEIGHTS_FROM.get(value, value),
                                   help="Which weights of each checkpoint: the better of raw and EMA at its epoch, EMA or raw "
                                        "(best: the old name of better).")
adapt_options = [
    click.option("--adapt-bn", is_flag=True, help="Re-estimate each checkpoint's BatchNorm statistics on the images first "
                                                   "(test-time adaptation for a shifted set; the files are unchanged)."),
    click.option("--adapt-prior", type=argument_type("adapt_prior"), default=0.0, show_default=True, metavar="N",
                 help="With --adapt-bn: prior strength N of the training statistics (Schneider et al.): they weigh N/(N+n)."),
]


def with_options(options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return wrap


held_out_option = click.option("--held-out", type=argument_type("held_out"), default="val", show_default=True,
                               help="The labelled images scored: val, each run's validation set; test, the labelled test set.")
checkpoints_argument = click.argument("checkpoints", nargs=-1, required=True)
batch_size_option = click.option("--batch-size", type=argument_type("batch_size"),
                                 help="Images per inference batch.  [default: the recipe's predict.batch_size]")
rounds_option = click.option("--rounds", type=argument_type("rounds"), default=20, show_default=True, help="Greedy selection rounds.")


def select_on_option(default: float):
    return click.option("--select-on", type=argument_type("select_on"), default=default, show_default=True,
                        help="Choose the blend on this stratified share of the labelled images; report on the rest.")


submission_options = [
    click.option("--template", metavar="CSV", help="The competition's sample submission: its header, id column, row order "
                                                   "and label style (names, indices, probabilities) are followed."),
    click.option("--labels", type=argument_type("labels"), help="Without --template: class index, class name, or one "
                                                                   "probability column per class.  [default: index]"),
    click.option("--id-column", help="Without --template: the id column's header.  [default: ID]"),
    click.option("--label-column", help="Without --template: the label column's header.  [default: Labels]"),
]


def submission_format(template, labels, id_column, label_column):
    """The SubmissionFormat of the options (None with a template: it is read once the classes are known)."""
    from kit.inference.submission import format_from_options
    if template:
        given = [name for name, value in (("--labels", labels), ("--id-column", id_column), ("--label-column", label_column)) if value]
        if given:
            raise KitError(f"{given[0]}: --template {template} sets the format; give one or the other")
        return None
    return format_from_options(labels or "index", id_column or "ID", label_column or "Labels")


def class_list(text: str | None) -> list[str] | None:
    """--classes A,B,...: the class names in order (None when not given); empty or repeated names are refused."""
    if not text:
        return None
    names = [c.strip() for c in text.split(",")]
    if "" in names or len(set(names)) != len(names):
        raise KitError(f"--classes {text}: give each class name once, separated by commas")
    return names
