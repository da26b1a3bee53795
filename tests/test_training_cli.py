"""LightningCLI and the YAML runner: a few steps on the tiny preset, checkpoint/resume, export, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from speed3r_sfm.training._lightning import pl
from speed3r_sfm.training.backbone import load_exported, read_weights
from speed3r_sfm.training.cli import fit_main
from speed3r_sfm.training.runner import fit as runner_fit
from speed3r_sfm.training.runner import load_config

REPO = Path(__file__).resolve().parents[1]


class StepRecorder(pl.Callback):
    """Records the data step of every training batch (class-level, for in-process runs)."""

    steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        StepRecorder.steps.append(int(batch["step"]))


@pytest.fixture(autouse=True)
def _fast_cpu_kernels():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # oneDNN's first-call setup costs seconds on the CPU
    yield
    torch.backends.mkldnn.enabled = enabled


def tiny_config(root: Path, **trainer) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "checkpoints"),
                        "save_last": True,
                        "save_top_k": 0,
                        "every_n_train_steps": 1,
                    },
                },
                {"class_path": "test_training_cli.StepRecorder"},
            ],
            **trainer,
        },
        "model": {
            "backbone": {"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}},
            "optim": {"warmup_steps": 1, "lr": 1e-4},
            "export_path": str(root / "weights.safetensors"),
            "export_dtype": "float32",
        },
        "data": {
            "height": 42,
            "width": 56,
            "views": {"min_views": 2, "max_views": 3},
            "synthetic": {"shadows": False},
            "val_batches": 1,
            "val_views": 2,
        },
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_fit_checkpoint_resume_and_export(tmp_path):
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    StepRecorder.steps = []
    # first run: the YAML through the runner (no jsonargparse), 2 steps
    trainer, module = runner_fit(load_config(config_path))
    assert trainer.global_step == 2 and StepRecorder.steps == [0, 1]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert "val/auc30" in trainer.callback_metrics
    # the backbone weights of a Lightning checkpoint (e.g. as init_checkpoint / teacher_checkpoint)
    weights = read_weights(last)
    assert weights.keys() == module.model.state_dict().keys()

    # second run: LightningCLI, resumed from last.ckpt, up to 4 steps: the data stream continues
    StepRecorder.steps = []
    cli = fit_main(["fit", "--config", str(config_path), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4 and StepRecorder.steps == [2, 3]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    # the LR schedule was restored: after 4 steps it sits at step 4 = the end of the cosine (min_lr_ratio
    # 0.01); a scheduler restarted at 0 would be at step 2, i.e. 1e-4 * (0.01 + 0.99 * 0.75)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-6)

    # export at the end of fit: safetensors + sidecar, loadable without the preset
    weights = tmp_path / "weights.safetensors"
    assert weights.exists() and weights.with_suffix(".json").exists()
    model = load_exported(weights)
    images = torch.rand(1, 2, 3, 42, 56)
    trained = cli.model.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(images)["depth"], trained(images)["depth"], atol=1e-6)

    # trained without an init checkpoint's settings, the export runs at the width it was trained at (the
    # preset's 84 px before)
    assert json.loads(weights.with_suffix(".json").read_text())["preprocessing"]["target_size"] == 56
    # the pipeline runs the Lightning checkpoint itself as it runs the export ("neither a VGGT nor a π³
    # checkpoint" before), and says what is missing when the export's sidecar is
    from speed3r_sfm.models.checkpoint import CheckpointError
    from speed3r_sfm.pipeline.backbone import load_backbone

    from_checkpoint = load_backbone(str(last), "auto", "cpu")
    from_export = load_backbone(str(weights), "auto", "cpu")
    assert from_checkpoint.name == f"training checkpoint ({last})"
    assert from_checkpoint.preprocessing == from_export.preprocessing
    assert from_checkpoint.attention == from_export.attention
    pixels = torch.rand(2, 3, 42, 56)
    a, b = from_checkpoint.predict(pixels), from_export.predict(pixels)
    assert torch.allclose(a.depth, b.depth, atol=1e-5)
    (tmp_path / "notes.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt is not a training checkpoint of speed3r-sfm"):
        load_backbone(str(tmp_path / "notes.ckpt"), "auto", "cpu")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match=r"exported by speed3r-sfm.*alone.json, missing"):
        load_backbone(str(alone), "auto", "cpu")
    alone.with_suffix(".json").write_text('{"name": "my notes"}')  # not a sidecar: not taken for one
    with pytest.raises(CheckpointError, match=r"alone.json, missing or not of speed3r-sfm"):
        load_backbone(str(alone), "auto", "cpu")
    # an edited sidecar: one error naming it (tracebacks, or a failure at the first image, before)
    meta = json.loads(weights.with_suffix(".json").read_text())
    for edit, why in (
        (lambda m: m.pop("config"), "KeyError"),
        (lambda m: m.update(preprocessing={"mode": "crop", "target_size": "big"}), "whole number"),
        (lambda m: m.update(preprocessing={"mode": "crop", "target_size": 85}), "not a multiple of 14"),
    ):
        edited = json.loads(json.dumps(meta))
        edit(edited)
        alone.with_suffix(".json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=f"alone.json does not describe alone.safetensors .*{why}"):
            load_backbone(str(alone), "auto", "cpu")


DDP_LAUNCHER = textwrap.dedent(
    """
    import sys

    import torch

    torch.backends.mkldnn.enabled = False
    from speed3r_sfm.training.cli import fit_main

    if __name__ == "__main__":
        fit_main(sys.argv[1:])
    """
)


def test_ddp_two_cpu_processes(tmp_path):
    config = tiny_config(tmp_path, strategy="ddp", devices=2)
    # with the tiny preset's track head, which no loss trains (DDP had stopped on its missing gradients)
    config["model"]["backbone"]["overrides"] = {}
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
    config["data"]["val_batches"] = 2
    config_path = write_config(tmp_path / "ddp.yaml", config)
    launcher = tmp_path / "launch.py"
    launcher.write_text(DDP_LAUNCHER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(launcher), "fit", "--config", str(config_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2


def test_fit_entry_point_passes_its_arguments_without_lightning_warning(monkeypatch, capsys):
    """``speed3r-sfm fit ...`` hands LightningCLI the command line's own arguments: no "args and sys.argv"
    warning, and the options reach the parser (here ``--print_config`` prints the config and exits)."""
    from speed3r_sfm import cli

    monkeypatch.setattr(sys, "argv", ["speed3r-sfm", "fit", "--seed_everything", "7", "--print_config"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["seed_everything"] == 7
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_fit_reports_data_and_weight_mistakes_in_one_line(tmp_path, capsys, monkeypatch):
    """From any folder (the configs name the shipped weights as "default"): a bad frame size, a missing
    dataset or a missing init checkpoint is one line and exit code 1, not a traceback."""
    from speed3r_sfm.cli import main

    monkeypatch.chdir(tmp_path)
    config = ["fit", "--config", str(REPO / "pipelines" / "finetune_colmap.yaml"), "--trainer.max_steps", "1"]
    for extra, message in (
        (["--data.height", "50", "--data.width", "80"], "must be multiples of 14, got 50x80"),
        (["--data.colmap_roots", f"[{tmp_path / 'nope'}]"], "no COLMAP model under"),
        (["--model.init_checkpoint", str(tmp_path / "gone.pt")], "gone.pt does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*config, "--data.cache_path", str(tmp_path / "frames.h5"), *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and "Traceback" not in err, err[-2000:]
    # the README's relative config path, from another folder: the shipped config's full path is named
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "pipelines/finetune_colmap.yaml"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert f"the shipped one is {REPO / 'pipelines' / 'finetune_colmap.yaml'}" in err


def test_a_new_fit_replaces_last_ckpt_says_where_it_exported_and_warns_of_a_short_warm_up(tmp_path, caplog):
    """The shipped configs turn the checkpoint's version counter off, so that the README's last.ckpt is the
    last run's (Lightning would write last-v1.ckpt beside a previous run's); the export's path is logged; a
    warm-up longer than the run (the learning rate never reaching ``lr``) is warned of."""
    for config in sorted((REPO / "pipelines").glob("*.yaml")):
        for callback in yaml.safe_load(config.read_text()).get("trainer", {}).get("callbacks", []):
            if callback["class_path"].endswith("ModelCheckpoint"):
                assert callback["init_args"]["enable_version_counter"] is False, config.name
    config = tiny_config(tmp_path)
    config["trainer"]["callbacks"][0]["init_args"]["enable_version_counter"] = False
    config["model"]["optim"]["warmup_steps"] = 5
    config_path = write_config(tmp_path / "tiny.yaml", config)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with (
        caplog.at_level("INFO"),
        pytest.warns(UserWarning, match=r"warmup_steps \(5\) > trainer.max_steps \(2\)"),
    ):
        fit_main(["fit", "--config", str(config_path)])
    assert f"exported the backbone to {tmp_path / 'weights.safetensors'}" in caplog.text
    assert "litlogger" not in caplog.text  # Lightning's advertisement is dropped
    first = last.stat().st_mtime_ns
    fit_main(["fit", "--config", str(config_path), "--trainer.max_steps", "1"])
    assert sorted(p.name for p in last.parent.glob("last*.ckpt")) == ["last.ckpt"]
    assert last.stat().st_mtime_ns > first
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1


def test_the_lightning_classes_import_from_the_training_package():
    """Lazily: ``import speed3r_sfm.training`` alone does not import Lightning."""
    probe = "import sys, speed3r_sfm.training as t; "
    probe += "print(set(t.__all__) <= set(dir(t)), 'lightning' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["True", "False"]  # listed by dir() (tab completion), Lightning not imported
    import speed3r_sfm.training as training
    from speed3r_sfm.training.data import ReconstructionDataModule
    from speed3r_sfm.training.module import ReconstructionModule

    assert training.ReconstructionModule is ReconstructionModule
    assert training.ReconstructionDataModule is ReconstructionDataModule
    assert training.fit_main is fit_main
    with pytest.raises(AttributeError, match="no attribute 'Module'"):
        training.Module  # noqa: B018
