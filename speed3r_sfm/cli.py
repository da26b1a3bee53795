"""``speed3r-sfm``: reconstruct a folder of images, write a synthetic scene, run the demo, or train.

    speed3r-sfm reconstruct IMAGE_DIR -o OUT [--model default] [--attention gsa] ...
    speed3r-sfm synthetic OUT [--seed 0] [--views 24]      # a COLMAP-format synthetic scene with ground truth
    speed3r-sfm demo [--output OUT]                         # synthetic scene, reconstructed and scored
    speed3r-sfm fit --config pipelines/<name>.yaml           # LightningCLI training / distillation
    speed3r-sfm view OUT [--port 8080]                       # viser viewer of a project (extra "viz")
    speed3r-sfm export OUT [-o points.glb|points.ply]        # points and cameras as GLB, or points as PLY
    speed3r-sfm export OUT --format tum [-o trajectory.txt]  # the camera trajectory (TUM RGB-D, for evo)

Argument parsing is jsonargparse's (as LightningCLI): every option of the called function is a flag; a
yes/no option given without a value (``--shared_camera``) means ``true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import traceback
import types
import typing
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable, Iterator
from pathlib import Path

from jsonargparse import ArgumentParser, DefaultHelpFormatter


def main(argv: list[str] | None = None) -> None:
    args = ["--output" if arg == "-o" else arg for arg in (sys.argv[1:] if argv is None else argv)]
    if args and args[0] == "fit":
        from .data.colmap_dataset import ColmapDatasetError
        from .models.checkpoint import CheckpointError
        from .training.cli import fit_main
        from .training.data import DataConfigError

        if problem := missing_config(args[1:]):
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(1)
        try:
            fit_main(args[1:])
        except (FileNotFoundError, CheckpointError, ColmapDatasetError, DataConfigError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        return
    with sigterm_deferred():
        _run_command(args)


def missing_config(args: list[str]) -> str | None:
    """Why ``fit``'s config file cannot be read (None if it can, or if the value is inline YAML, which
    jsonargparse also takes): the shipped configs live in the source tree's ``pipelines/``, so a relative
    path given from another folder names that folder too."""
    values = [b for a, b in zip(args, args[1:], strict=False) if a in ("--config", "-c")]
    values += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for value in values:
        inline = "\n" in value or Path(value).suffix.lower() not in (".yaml", ".yml", ".json")
        if inline or Path(value).is_file():
            continue
        shipped = Path(__file__).resolve().parents[1] / "pipelines" / Path(value).name
        where = f"; the shipped one is {shipped}" if shipped.is_file() else ""
        return f"config file {value} does not exist (relative to {Path.cwd()}){where}"
    return None


def _run_command(args: list[str]) -> None:
    """Every command but ``fit``, through jsonargparse."""
    from jsonargparse import auto_cli

    from .demo import demo_command, synthetic_command
    from .pipeline.cli import reconstruct_command
    from .viz import export_command, view_command

    commands = {
        "reconstruct": reconstruct_command,
        "synthetic": synthetic_command,
        "demo": demo_command,
        "fit": fit,
        "view": view_command,
        "export": export_command,
    }
    if args and args[0] in commands:
        args = with_bool_values(args, commands[args[0]])
    from .demo import SceneTooLargeError
    from .pipeline.backbone import DeviceNotAvailableError, ModelNotAvailableError
    from .pipeline.export import OutputPathError
    from .pipeline.reconstruct import ReconstructionError

    # what the user can fix (or a scene that gives no reconstruction): one line, no traceback
    user_errors = (
        DeviceNotAvailableError,
        ModelNotAvailableError,
        FileExistsError,
        OutputPathError,
        SceneTooLargeError,
        ReconstructionError,
    )

    try:
        with terminate_as_interrupt():
            result = auto_cli(
                commands,
                args=args,
                as_positional=True,
                description=__doc__,
                formatter_class=HelpFormatter,
                parser_class=WholeNamesParser,
                prog="speed3r-sfm",
            )
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (TypeError, ValueError) as error:
        if (refused := refused_option(error)) is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        sys.exit(1)  # as the same value given through a shortcut (reconstruct --min_work_scale 2)
    except Terminated:
        print("\nterminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C: outputs are written whole or not at all, nothing to show
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and result:
        sys.exit(result)


def fit() -> None:
    """Train, fine-tune or distil with LightningCLI: speed3r-sfm fit --config pipelines/<name>.yaml
    (`speed3r-sfm fit --help` lists its options)."""
    raise AssertionError("main() runs fit through LightningCLI")  # only listed here, for --help


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler) received: unwinds as Ctrl-C does."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated`, so that temporary outputs are removed as on
    Ctrl-C (the crash handler that pycolmap's glog installs printed a stack trace and left them behind).
    Not around ``fit``: Lightning handles SIGTERM itself."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # one held by sigterm_deferred: now
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back (block it in the main thread, and in the threads it starts) until
    :func:`terminate_as_interrupt` takes it: importing pycolmap installs glog's crash handler, which printed
    a stack trace for a SIGTERM received before ours was set. The previous signal mask is restored at the
    end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WholeNamesParser(ArgumentParser):
    """jsonargparse's parser without argparse's abbreviations (``--options.bundle.loss_scal 2`` is an
    error, not ``loss_scale`` set silently: a typo could set another option), and with short errors: no
    usage block (the tip names ``--help``), and a refused ``--options.*`` value says only what the options
    dataclass refused, not every type of the ``PipelineOptions | None`` union."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def print_usage(self, file: typing.IO[str] | None = None) -> None:
        """Nothing: the usage of reconstruct is two dozen lines; ``--help`` shows it."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        super().error(options_error(message), ex)


def options_error(message: str) -> str:
    """jsonargparse's message for a value the ``options`` union refused, cut to what the dataclass said
    (``Parser key "options": Parser key "bundle.max_reproj_error": Expected a <class 'float'>. Got value:
    abc``); any other message as it is."""
    lines = message.splitlines()
    start = next((i for i, line in enumerate(lines) if "Problem with given class_path" in line), None)
    if start is None:
        return message
    nested = []
    for line in lines[start + 1 :]:
        if line.strip().startswith("- "):
            break
        nested.append(line.strip())
    return " ".join([lines[0].strip(), *nested])


class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's help with each option's type and default, the description kept as written."""


def refused_option(error: BaseException) -> BaseException | None:
    """The error of an options dataclass (``--options.*``) that refused a value (raised in its
    ``__post_init__``) where jsonargparse, building it, failed with ``error``; None for any other error."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or "jsonargparse" not in frames[-1].filename:
        return None
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    raised_in = {frame.name for frame in traceback.extract_tb(root.__traceback__)}
    return root if "__post_init__" in raised_in else None


def with_bool_values(args: list[str], command: Callable) -> list[str]:
    """``args`` with ``true`` after every yes/no option of ``command`` that is given without a value (the
    last argument, or followed by another option): jsonargparse's bool options take one. The fields of a
    dataclass parameter count too (``--options.bundle.readjust``)."""
    flags = bool_options(command)
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("true")
    return out


def bool_options(command: Callable) -> set[str]:
    """The yes/no options of ``command`` (``--name``), with those of its dataclass parameters' fields
    (``--name.field``, nested)."""
    found: set[str] = set()

    def walk(flag: str, hint: object) -> None:
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        choices = typing.get_args(hint) if union else (hint,)
        if bool in choices:
            found.add(flag)
        for choice in choices:
            if dataclasses.is_dataclass(choice):
                for name, field_hint in typing.get_type_hints(choice).items():
                    walk(f"{flag}.{name}", field_hint)

    for name, hint in typing.get_type_hints(command).items():
        if name != "return":
            walk(f"--{name}", hint)
    return found


if __name__ == "__main__":
    main()
