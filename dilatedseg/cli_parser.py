"""The argument parser of `dilatedseg fit / validate / test / predict`: jsonargparse's parse
errors as one line that names the problem and the --help that lists the options, batch limits
read as Lightning means them, and the options as typed on a command line."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import typing
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser

# LightningCLI's subcommands, then the verbs of `dilatedseg` that this package adds.
SUBCOMMANDS = ("fit", "validate", "test", "predict")
VERBS = (*SUBCOMMANDS, "prepare", "sweep", "summary")


class ConciseParser(LightningArgumentParser):
    """A parse error (misspelt option, bad value, missing config file) is the message and a
    pointer to --help, not the ~100-line usage that jsonargparse prints first for fit. Its
    program is `dilatedseg` also where jsonargparse makes one without a name (the parser of a
    ``--data.help CLASS``), which argparse would name after the started file (cli.py)."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        super().__init__(*args, prog=prog or "dilatedseg", **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # parsing tentatively (it handles the raise), or debug
        if message.startswith("Unexpected config:"):  # a file that is no mapping of options
            content = " ".join(message.split(":", 1)[1].split())[:60]
            message = ("a --config file holds no options: it is empty, only comments, or not "
                       f"a YAML mapping of options ({content or 'empty'})")
        if message.startswith("argument subcommand: invalid choice"):
            # A misspelt verb: offer all of them, not only LightningCLI's four.
            message = re.sub(r"\(choose from [^)]*\)", "(choose from " + ", ".join(VERBS) + ")",
                             message)
        message = missing_config_problem(message) or message
        message, help_option = (data_class_problem(message) or subclass_problem(message)
                                or (message, "--help"))
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n(the options: {prog} {help_option})\n")
        sys.exit(2)


# jsonargparse's error for an option of a class given by class_path (the data module): each
# type the option may have, and inside, under this line, the class's own problem.
CLASS_PROBLEM = re.compile(r"^( *)- Problem with given class_path '([^']+)':\n((?:\1 .*(?:\n|$))+)",
                           re.MULTILINE)


def missing_config_problem(message: str) -> str | None:
    """jsonargparse names a missing --config file by its path in the working directory; a
    relative one was looked for in the package checkout too (cli.checkout_configs): name both
    places. None for other messages."""
    missing = re.match(r"""Parser key "config": File does not exist: '([^']+)'""", message)
    if missing is None or not Path(missing.group(1)).is_relative_to(Path.cwd()):
        return None
    from dilatedseg.cli import PACKAGE_CONF, PACKAGE_ROOT

    path = Path(missing.group(1)).relative_to(Path.cwd())
    if (PACKAGE_ROOT / path).is_file():  # (given as an absolute path: not looked for there)
        return None
    if Path.cwd().resolve() == PACKAGE_ROOT:
        checkout = ""
    elif PACKAGE_CONF.is_dir():
        checkout = f" nor in the package checkout ({PACKAGE_ROOT})"
    else:  # a non-editable install: no checkout beside the package to read conf/ from
        checkout = (f"; dilatedseg is installed without its checkout ({PACKAGE_ROOT} has no "
                    "conf/): run in the checkout, pass the file's path, or install the "
                    "checkout with pip install -e")
    return (f"File does not exist: --config {path} is not in the working directory "
            f"({Path.cwd()}){checkout}")


def data_class_problem(message: str) -> tuple[str, str] | None:
    """``--data=voc`` or ``--data.help voc``: a dataset's name where the data module's class
    goes (jsonargparse lists each type --data could have); the class to pass, or the list of
    them. None otherwise."""
    given = re.search(r"Expected a dot import path string: (\S+)", message)
    option = re.match(r'(?:Parser key "data"|--data\.help):', message)
    if option is None or given is None:
        return None
    option = "--data=" if option.group().startswith("Parser") else "--data.help "
    from dilatedseg import data

    classes = {datamodule.name: datamodule.__name__ for datamodule in (
        data.ShapesDataModule, data.VOCDataModule, data.CamVidDataModule, data.KITTIDataModule,
        data.CityscapesDataModule)}
    value = given.group(1)
    name = value.lower().removesuffix("datamodule")
    recipe = f", or the dataset's recipe: --config conf/{name}.yaml" if option == "--data=" else ""
    fix = (f"{option}{classes[name]}{recipe}" if name in classes
           else "one of " + ", ".join(classes.values()))
    return f"{option}{value} is not a data module class: pass {fix}", "--help"


def subclass_problem(message: str) -> tuple[str, str] | None:
    """The problem of an option of the data module (``--data.init_args.crop_sise=64``, a value
    of the wrong type, a class_path that does not import), alone and named by its full option,
    and the --help option that lists the class's options; None for other messages."""
    key, problem = re.match(r'Parser key "([^"]+)":', message), CLASS_PROBLEM.search(message)
    if key is None or problem is None:
        return None
    key, class_path = key.group(1), problem.group(2)
    inner = textwrap.dedent(problem.group(3)).strip()
    name = class_path.rsplit(".", 1)[-1]
    if inner.startswith("Parser key "):  # a value of the wrong type
        inner = inner.replace('Parser key "', f'Parser key "{key}.init_args.', 1)
    elif unknown := re.match(r"Option '([^']+)' is not accepted", inner):
        inner = f"{name} has no option --{key}.init_args.{unknown.group(1)}"
    else:  # the class itself
        return f"--{key}.class_path={class_path}: {inner}", "--help"
    return inner, f"--{key}.help {name}"


def read_ints_as_ints(parser) -> None:
    """Lightning types the batch limits ``float | int | None`` and jsonargparse tries float
    first, so ``--trainer.limit_val_batches=1`` would be 1.0: all batches, not one. Try int
    first (1 = one batch, 0.5 = half of them), as Lightning means."""
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)
        args = getattr(hint, "__args__", ())
        if typing.get_origin(hint) is typing.Union and float in args and int in args:
            # jsonargparse's private ActionTypeHint._typehint: it has no public way to change an
            # added argument's type (test_read_ints_as_ints_still_finds_jsonargparses_types).
            action._typehint = typing.Union[tuple(sorted(args, key=lambda t: t is not int))]  # noqa: UP007


def config_arguments(argv: list[str]) -> list[tuple[int, str]]:
    """Each ``--config PATH``, ``--config=PATH`` or ``-c PATH`` of a command line: the index of
    the argument that holds the path, and the path."""
    found, path_next = [], False
    for index, arg in enumerate(argv):
        if path_next:
            found.append((index, arg))
        elif arg.startswith("--config="):
            found.append((index, arg.split("=", 1)[1]))
        path_next = not path_next and arg in ("--config", "-c")
    return found


def model_options(argv: list[str]) -> list[str]:
    """The names of the ``--model.<name>[=value]`` options of a command line, as typed:
    ``crf`` for ``--model.crf=dense``, ``crf_options.iterations`` for a nested one."""
    return [arg.removeprefix("--model.").split("=", 1)[0] for arg in argv
            if arg.startswith("--model.")]
