"""The ``speed3r-sfm`` command line: subcommands dispatch, -o works, bad input exits non-zero."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import typing
from pathlib import Path

import docstring_parser
import pycolmap
import pytest

from speed3r_sfm.cli import main
from speed3r_sfm.pipeline import cli as pipeline_cli


def test_synthetic_writes_a_colmap_dataset(tmp_path):
    out = tmp_path / "scene"
    main(["synthetic", str(out), "--views", "3", "--height", "56", "--width", "70"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert pycolmap.Reconstruction(out / "sparse" / "0").num_reg_images() == 3
    assert (out / "depths.h5").is_file()


def test_synthetic_refuses_an_existing_folder_before_rendering(tmp_path, capsys, monkeypatch):
    (tmp_path / "scene" / "images").mkdir(parents=True)
    monkeypatch.setattr("speed3r_sfm.demo.render_scene", lambda *a, **k: pytest.fail("rendered"))
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", str(tmp_path / "scene"), "--views", "3"])
    assert exit_info.value.code == 1 and "--overwrite true" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--views", "1"], "views"),
        (["--views", "0"], "views"),
        (["--seed", "-1"], "seed"),
        (["--height", "0"], "height"),
        (["--width", "5000"], "width"),
        (["--views", "10000", "--height", "4096", "--width", "4096"], "at most 100 M are rendered at once"),
    ],
)
def test_synthetic_and_demo_check_scene_arguments_before_rendering(
    option, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("speed3r_sfm.demo.render_scene", lambda *a, **k: pytest.fail("rendered"))
    for command in (["synthetic", str(tmp_path / "scene")], ["demo", "--output", str(tmp_path / "demo")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, *option])
        assert exit_info.value.code != 0 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_synthetic_replaces_only_scene_folders_and_the_demo_checks_its_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("speed3r_sfm.demo.render_scene", lambda *a, **k: pytest.fail("rendered"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("keep")
    for overwrite in ("false", "true"):  # the reason first: without overwrite it had suggested overwrite
        with pytest.raises(SystemExit) as exit_info:
            main(["synthetic", str(tmp_path / "notes"), "--overwrite", overwrite])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "is not a scene folder" in err and "pass overwrite" not in err
    (tmp_path / "dataset" / "images").mkdir(parents=True)  # a COLMAP dataset with more than a scene's files
    (tmp_path / "dataset" / "database.db").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", str(tmp_path / "dataset"), "--overwrite", "true"])
    assert exit_info.value.code == 1 and "it holds database.db" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", str(tmp_path / "afile" / "scene")])
    assert exit_info.value.code == 1 and "afile is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "here" / "images").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", ".", "--overwrite", "true"])
    assert exit_info.value.code == 1 and "is the current folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output", str(tmp_path / "demo"), "--model", str(tmp_path / "nothere.pt")])
    assert exit_info.value.code == 1 and "nothere.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and (tmp_path / "notes" / "thesis.txt").read_text() == "keep"


def test_reconstruct_of_an_empty_folder_exits_with_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", str(tmp_path / "empty"), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reconstruct_without_output_says_how_to_give_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "-o OUT" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_reconstructs_and_scores_a_scene_with_the_default_model(tmp_path):
    args = ["--views", "8", "--height", "294", "--width", "392", "--trajectory", "forward"]
    main(["demo", "--output", str(tmp_path / "demo"), *args])
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["model"] == "default" and summary["scene"]["views"] == 8
    for stage in ("feed-forward", "after bundle adjustment"):
        scores = summary["scores"][stage]
        assert 0.0 <= scores["auc30"] <= 1.0 and scores["registered"] == 8
    adjusted = summary["scores"]["after bundle adjustment"]["median_rotation_error_deg"]
    assert adjusted < 1.0 < summary["scores"]["feed-forward"]["median_rotation_error_deg"]
    assert (tmp_path / "demo" / "reconstruction" / "sparse" / "0" / "images.bin").is_file()


def test_reconstruct_logs_a_skipped_file_on_its_own_line_and_draws_the_bar_on_a_terminal_only(tmp_path):
    """The skip warning goes through tqdm (``logging_redirect_tqdm``), not into the middle of the bar; the
    bar draws on a terminal, and a log file gets the warnings and the summary without its redraws."""
    scene = tmp_path / "scene"
    main(["synthetic", str(scene), "--views", "8", "--height", "147", "--width", "196"])  # reconstructs 8/8
    (scene / "images" / "notes.jpg").write_text("not an image")
    command = [sys.executable, "-m", "speed3r_sfm.cli", "reconstruct", str(scene / "images"), "-o"]
    run = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    lines = re.split(r"[\r\n]", run.stderr)
    warning = [line for line in lines if "notes.jpg" in line]
    assert warning and all(line.startswith("WARNING: skipped") for line in warning), run.stderr
    assert "\r" not in run.stderr and "stage/s" not in run.stderr  # no bar in a file
    assert "INFO: model: " in run.stderr and "INFO: write: " in run.stderr  # a line per stage instead
    assert run.stdout.startswith("reconstructed ")  # the summary

    import fcntl  # POSIX terminals
    import pty
    import termios

    leader, follower = pty.openpty()  # stderr a terminal of 100 columns, as in an interactive shell
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    tty_run = [*command, str(tmp_path / "out_tty")]
    with subprocess.Popen(tty_run, stdout=subprocess.PIPE, stderr=follower) as proc:
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            drawn += chunk
        proc.wait(timeout=300)
    os.close(leader)
    text = drawn.decode(errors="replace")
    assert proc.returncode == 0
    assert "\rreconstruct:" in text and "stage/s" in text, text  # the bar, redrawn in place
    assert "INFO: model: " not in text
    assert "WARNING: skipped" in text


def test_reconstruct_takes_known_intrinsics_as_colmap_does(tmp_path, capsys):
    """``--camera_params`` in COLMAP's format: the project's cameras carry them; malformed ones are an
    error that names the camera model's parameters, before any output."""
    scene = tmp_path / "scene"
    main(["synthetic", str(scene), "--views", "6", "--height", "224", "--width", "294"])
    (truth,) = pycolmap.Reconstruction(scene / "sparse" / "0").cameras.values()
    text = ",".join(f"{p:.10g}" for p in truth.params)
    command = ["reconstruct", str(scene / "images"), "--camera_model", truth.model.name, "--quiet", "true"]
    main([*command, "-o", str(tmp_path / "out"), "--camera_params", text])  # exits only on an error
    model = pycolmap.Reconstruction(tmp_path / "out" / "sparse" / "0")
    cameras = model.cameras.values()
    assert len(cameras) == model.num_reg_images() >= 2  # one per registered image
    assert all(c.params.tolist() == pytest.approx(truth.params.tolist(), rel=1e-9) for c in cameras)
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "-o", str(tmp_path / "bad"), "--camera_params", "270,147,112"])
    assert exit_info.value.code == 1
    assert "PINHOLE takes 4 finite numbers, fx, fy, cx, cy" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _readme_commands(subcommand: str) -> list[list[str]]:
    """The README's ``speed3r-sfm SUBCOMMAND ...`` example lines, as argument lists (comments dropped)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [
        line.split("  #")[0] for line in readme.splitlines() if line.startswith(f"speed3r-sfm {subcommand} ")
    ]
    return [shlex.split(line)[1:] for line in lines]


@pytest.fixture
def reconstruct_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``reconstruct`` call the CLI makes; nothing is reconstructed."""
    seen: list[dict] = []

    @functools.wraps(pipeline_cli.reconstruct_command)
    def record(**kwargs):
        seen.append(kwargs)
        return 0

    monkeypatch.setattr(pipeline_cli, "reconstruct_command", record)
    return seen


def test_readme_reconstruct_examples_parse(reconstruct_calls):
    """Every ``speed3r-sfm reconstruct`` line of the README parses."""
    commands = _readme_commands("reconstruct")
    assert len(commands) >= 6
    for argv in commands:
        main(argv)
    assert len(reconstruct_calls) == len(commands)
    assert any(call["shared_camera"] is True for call in reconstruct_calls)
    assert any(call["undistort"] is True for call in reconstruct_calls)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--options.bundle.loss_scal", "2"],
            'Parser key "options": unrecognized arguments: --bundle.loss_scal=2',
        ),
        (["--max_key", "100"], "unrecognized arguments: --max_key 100"),
        (
            ["--options.bundle.max_reproj_error", "abc"],
            'Parser key "options": Parser key "bundle.max_reproj_error": Expected a <class \'float\'>. '
            "Got value: abc",
        ),
    ],
)
def test_option_names_are_whole_and_a_wrong_one_is_a_short_error(reconstruct_calls, capsys, argv, message):
    """argparse would take ``--options.bundle.loss_scal`` for ``loss_scale`` (a typo setting another
    option); the error is one line and the tip, not the two-dozen-line usage."""
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "images", "-o", "out", *argv])
    assert exit_info.value.code == 2 and reconstruct_calls == []
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "tip: For details of accepted options run: speed3r-sfm reconstruct --help",
        f"error: {message}",
    ]
    main(["reconstruct", "images", "-o", "out", "--options.bundle.loss_scale", "2", "--max_keypoints", "100"])
    [call] = reconstruct_calls
    assert call["options"].bundle.loss_scale == 2.0 and call["max_keypoints"] == 100


def test_yes_no_options_given_without_a_value_mean_true(reconstruct_calls):
    main(
        [
            "reconstruct",
            "images",
            "-o",
            "out",
            "--options.bundle.polish",
            "false",
            "--options.bundle.refine_principal_point",
        ]
    )
    options = reconstruct_calls.pop()["options"]
    assert options.bundle.polish is False and options.bundle.refine_principal_point is True
    main(["reconstruct", "images", "-o", "out", "--shared_camera", "--undistort", "--readjust", "false"])
    main(["reconstruct", "images", "-o", "out", "--deterministic"])
    main(["reconstruct", "images", "-o", "out", "--shared_camera", "per_folder", "--recursive"])
    first, second, third = reconstruct_calls
    assert first["shared_camera"] is True and first["undistort"] is True and first["readjust"] is False
    assert second["deterministic"] is True and second["shared_camera"] is False
    assert third["shared_camera"] == "per_folder" and third["recursive"] is True


def test_ctrl_c_exits_quietly(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("speed3r_sfm.demo.render_scene", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", str(tmp_path / "scene")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and "interrupted" in err and "Traceback" not in err


def test_sigterm_exits_like_ctrl_c_and_leaves_no_temporary_output(tmp_path, capsys, monkeypatch):
    """`kill` / `timeout` during the run: the staged output is removed (pycolmap's crash handler had
    printed a stack trace and left it behind), exit code 143, the previous handler restored."""
    import os
    import signal

    import speed3r_sfm.pipeline.export as export

    def killed_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "write_report", killed_while_writing)
    scene = tmp_path / "scene"
    main(["synthetic", str(scene), "--views", "8", "--width", "196", "--height", "147"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", str(scene / "images"), "-o", str(tmp_path / "out"), "--quiet", "true"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 143 and "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]  # no OUT, no .out.tmp-* folder
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_before_the_handler_is_set_waits_for_it():
    """A SIGTERM received while the commands import (pycolmap's glog installs a crash handler that printed a
    stack trace) is held back and taken by the handler once it is set; the signal mask is restored."""
    import signal
    import threading

    from speed3r_sfm.cli import Terminated, sigterm_deferred, terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_deferred():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            assert signal.SIGTERM in signal.sigpending()
            with terminate_as_interrupt():
                pytest.fail("the block ran after a SIGTERM")
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.getsignal(signal.SIGTERM) is before


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "{reconstruct,synthetic,demo,fit,view,export}" in out  # fit was missing
    assert "Train, fine-tune or distil with LightningCLI" in out


def _option_classes() -> list[type]:
    """``PipelineOptions`` and every options dataclass nested in it (``matching.refine`` included)."""
    found = [pipeline_cli.PipelineOptions]
    for cls in found:
        for hint in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(hint) and hint not in found:
                found.append(hint)
    return found


def _field_docs(cls: type) -> dict[str, str]:
    """``cls``'s fields as its docstring's ``Attributes:`` section describes them (jsonargparse's help)."""
    return {param.arg_name: param.description or "" for param in docstring_parser.parse(cls.__doc__).params}


def test_every_option_field_has_a_short_description_in_its_class_docstring():
    """A field added without an ``Attributes:`` entry (or an entry left behind by a renamed field) fails:
    ``--options.help`` would show it with no description."""
    classes = {cls.__name__: cls for cls in _option_classes()}
    assert set(classes) == {
        "PipelineOptions",
        "KeypointOptions",
        "MatchOptions",
        "RefineOptions",
        "BundleOptions",
        "TokenPoseOptions",
        "LoopOptions",
        "RescueOptions",
    }
    for name, cls in classes.items():
        docs = _field_docs(cls)
        fields = [field.name for field in dataclasses.fields(cls)]
        missing = [f for f in fields if not docs.get(f, "").strip()]
        assert missing == [], f"{name}: fields without a description"
        assert set(docs) <= set(fields), f"{name}: descriptions of no field"
        for field, text in docs.items():  # user-facing text: no benchmark records
            assert not re.search(r"\.(md|jsonl)\b", text), f"{name}.{field}: {text}"


def test_options_help_describes_the_fields_of_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "--options.help", "PipelineOptions"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    flat = re.sub(r"\s+", "", out)  # the help is wrapped to the terminal (at hyphens too)
    classes = {cls.__name__: cls for cls in _option_classes()}
    for flag, cls in (
        ("max_image_size", "PipelineOptions"),
        ("keypoints.max_keypoints", "KeypointOptions"),
        ("matching.refine.min_ncc", "RefineOptions"),
        ("bundle.max_reproj_error", "BundleOptions"),
        ("loops.window", "LoopOptions"),
        ("rescue.sift", "RescueOptions"),
    ):
        described = _field_docs(classes[cls])[flag.rsplit(".", 1)[-1]]
        assert re.sub(r"\s+", "", f"--options.{flag} ") in flat
        assert re.sub(r"\s+", "", f"{described} (type:") in flat, flag
    assert re.sub(r"\s+", "", "keypoints per view; more gives more matches") in flat
    # each stage's fields under a heading: the description of its PipelineOptions field, on one line
    stages = _field_docs(pipeline_cli.PipelineOptions)
    for stage in ("keypoints", "matching", "bundle", "token_poses", "loops", "rescue"):
        assert f"\n{stages[stage].rstrip('.')}:\n  --options.{stage}." in out, stage
    assert "\nKeypoint detection settings (distances in model pixels unless stated):\n" in out


def test_synthetic_fills_an_empty_folder_and_replaces_a_scene_only_when_asked(tmp_path, capsys):
    (tmp_path / "scene").mkdir()  # empty: used, as reconstruct uses an empty OUT
    args = ["synthetic", str(tmp_path / "scene"), "--views", "2", "--height", "40", "--width", "52"]
    main(args)
    assert sorted(p.name for p in (tmp_path / "scene").iterdir()) == ["depths.h5", "images", "sparse"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and "holds a scene already" in capsys.readouterr().err
    main([*args, "--overwrite", "true"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]  # no temporary folder left


@pytest.fixture
def pipeline_calls(monkeypatch) -> list[dict]:
    """The keyword arguments (options included) of every ``run_pipeline`` call of ``reconstruct``."""
    seen: list[dict] = []
    monkeypatch.setattr(pipeline_cli, "run_pipeline", lambda image_dir, output, **kwargs: seen.append(kwargs))
    return seen


def test_every_pipeline_option_is_an_argument_and_the_shortcuts_win(pipeline_calls, tmp_path):
    """``--options.STAGE.NAME`` reaches ``PipelineOptions``; a shortcut given (``--max_keypoints``) wins over
    it, one not given leaves it; without either, the documented defaults."""
    base = ["reconstruct", str(tmp_path), "-o", str(tmp_path / "out"), "--quiet"]
    main([*base, "--options.bundle.max_reproj_error", "2", "--options.keypoints.max_keypoints", "300"])
    main([*base, "--options.keypoints.max_keypoints", "300", "--max_keypoints", "500", "--deterministic"])
    main([*base, "--max_image_size", "800", "--loop_closure", "false", "--readjust", "false"])
    main(base)
    first, second, third, plain = (call["options"] for call in pipeline_calls)
    assert first.bundle.max_reproj_error == 2.0 and first.keypoints.max_keypoints == 300
    assert second.keypoints.max_keypoints == 500 and second.bundle.num_threads == 1
    assert third.max_image_size == 800 and not third.loops.enabled and not third.bundle.readjust
    assert third.keypoints.max_keypoints == 1024 and third.bundle.num_threads == -1
    assert plain == pipeline_cli.PipelineOptions()


def test_ready_pipeline_configs_parse_and_set_what_they_say(pipeline_calls, tmp_path):
    root = Path(__file__).resolve().parents[1] / "pipelines"
    configs = sorted(root.glob("reconstruct_*.yaml"))
    assert [p.name for p in configs] == ["reconstruct_splatting.yaml", "reconstruct_video.yaml"]
    for config in configs:
        main(["reconstruct", "--config", str(config), str(tmp_path), "-o", str(tmp_path / "out"), "--quiet"])
    splatting, video = pipeline_calls
    assert splatting["shared_camera"] is True and splatting["undistort"] is True
    assert video["shared_camera"] is True and video["chunk_size"] == 48 and video["ordered"] is True
    assert video["options"].loops.enabled

    own = tmp_path / "own.yaml"  # a stage's setting from a file, and a shortcut after --config over it
    own.write_text("options:\n  bundle:\n    max_reproj_error: 2.5\n  keypoints:\n    max_keypoints: 300\n")
    main(
        ["reconstruct", "--config", str(own), str(tmp_path), "-o", "out", "--max_keypoints", "700", "--quiet"]
    )
    options = pipeline_calls[-1]["options"]
    assert options.bundle.max_reproj_error == 2.5 and options.keypoints.max_keypoints == 700


def test_an_option_value_its_stage_refuses_is_a_one_line_error(pipeline_calls, tmp_path, capsys):
    for option, message in (
        (["--options.bundle.rounds", "0"], "BundleOptions.rounds must be at least 1, got 0"),
        (["--options.matching.refine.patch_size", "10"], "RefineOptions.patch_size must be odd, got 10"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["reconstruct", str(tmp_path), "-o", str(tmp_path / "out"), *option])
        assert stopped.value.code == 1
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert pipeline_calls == []
    for option in ("--options.min_work_scale", "--min_work_scale"):  # one value, two ways: one exit code
        with pytest.raises(SystemExit) as stopped:
            main(["reconstruct", str(tmp_path), "-o", str(tmp_path / "out"), option, "2"])
        assert stopped.value.code == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["error: min_work_scale must lie in [0, 1], got 2.0"] * 2


def test_fit_config_check_names_missing_files_only(tmp_path):
    """``--config``/``-c``/``--config=`` naming a missing .yaml is refused with the shipped config's path;
    inline YAML (which jsonargparse takes as a config) and existing files pass."""
    from speed3r_sfm.cli import missing_config

    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "finetune_colmap.yaml"
    for args in (["--config", "nope/finetune_colmap.yaml"], ["-c", "x/finetune_colmap.yaml"]):
        assert f"the shipped one is {shipped}" in missing_config(args)
    assert "does not exist" in missing_config([f"--config={tmp_path / 'gone.yml'}"])
    assert missing_config(["--config", '{"trainer": {"max_steps": 1}}']) is None
    assert missing_config(["--config", "trainer:\n  max_steps: 1"]) is None
    assert missing_config(["--config", str(shipped), "--trainer.max_steps", "1"]) is None
