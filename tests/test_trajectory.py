"""speed3r_sfm.trajectory: camera trajectories as TUM RGB-D text, and ``speed3r-sfm export --format tum``."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch

from speed3r_sfm import trajectory
from speed3r_sfm.cli import main
from speed3r_sfm.data.colmap_dataset import build_reconstruction


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _model(names: list[str], seed: int = 0):
    rng = np.random.default_rng(seed)
    poses = torch.tensor(
        np.array([np.concatenate([_random_rotation(rng), rng.normal(size=(3, 1))], 1) for _ in names])
    )
    k = torch.tensor([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]]).expand(len(names), 3, 3)
    return build_reconstruction(k, poses, (48, 64), names), poses.numpy()


def _matrix_from_quaternion(x: float, y: float, z: float, w: float) -> np.ndarray:
    """The textbook Hamilton formula (reference for pycolmap's quaternions)."""
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _read(path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]


def test_a_line_is_the_cameras_centre_and_world_from_camera_rotation(tmp_path):
    names = [f"frame_{i:04d}.png" for i in (3, 0, 2, 1)]
    rec, cam_from_world = _model(names)
    path = trajectory.write_tum(rec, tmp_path / "trajectory.txt")
    assert path.read_text().splitlines()[0] == trajectory.TUM_HEADER
    rows = _read(path)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]  # index in name order, in time order
    for row in rows:
        index = names.index(f"frame_{int(row[0]):04d}.png")
        rotation, translation = cam_from_world[index, :, :3], cam_from_world[index, :, 3]
        tx, ty, tz, qx, qy, qz, qw = map(float, row[1:])
        np.testing.assert_allclose([tx, ty, tz], -rotation.T @ translation, atol=1e-7)
        assert qx * qx + qy * qy + qz * qz + qw * qw == pytest.approx(1.0, abs=1e-7)
        np.testing.assert_allclose(_matrix_from_quaternion(qx, qy, qz, qw), rotation.T, atol=1e-7)


@pytest.mark.parametrize(
    ("names", "stamps"),
    [
        (["1305031102.211214.png", "1305031102.175304.png"], ["1305031102.175304", "1305031102.211214"]),
        (  # EuRoC: nanoseconds, in seconds without a digit lost
            ["1403636579763555584.png", "1403636579813555456.png"],
            ["1403636579.763555584", "1403636579.813555456"],
        ),
        (["00010.jpg", "00002.jpg"], ["2", "10"]),  # frame numbers, in time (not name) order
        (["frame_10.png", "frame_9.png", "frame_011.png"], ["9", "10", "11"]),  # the number in the name
        (["c1_f3.png", "c1_f2.png"], ["2", "3"]),  # its last number
        (["b.png", "a.png", "c.png"], ["0", "1", "2"]),  # no number: a.png, b.png, c.png
        (["7.png", "left.png"], ["0", "1"]),  # not every name a number
        (["a1.png", "b1.png", "a2.png"], ["0", "1", "2"]),  # numbers not distinct: natural order
        (
            ["rgb_1305031102.211214.png", "rgb_1305031102.175304.png"],
            ["1305031102.175304", "1305031102.211214"],
        ),
        (
            ["cam_1403636579763555584.png", "cam_1403636579813555456.png"],
            ["1403636579.763555584", "1403636579.813555456"],
        ),
        (["at 12.30.15.png", "at 12.31.02.png"], ["0", "1"]),  # numbers against the name order: indices
    ],
)
def test_timestamps_come_from_numeric_stems_else_the_name_order(tmp_path, names, stamps):
    rec, _ = _model(names)
    rows = _read(trajectory.write_tum(rec, tmp_path / "t.txt"))
    assert [row[0] for row in rows] == stamps


def test_unregistered_images_are_left_out_and_keep_their_place(tmp_path):
    rec, _ = _model([f"frame_{i}.png" for i in (8, 9, 10, 11, 12)])
    rec.deregister_frame(rec.image(3).frame_id)  # frame_10.png
    rows = _read(trajectory.write_tum(rec, tmp_path / "t.txt"))
    assert [row[0] for row in rows] == ["8", "9", "11", "12"]  # the frame numbers of the names
    for image_id in (1, 2, 4, 5):
        rec.deregister_frame(rec.image(image_id).frame_id)
    with pytest.raises(ValueError, match="no image is registered"):
        trajectory.write_tum(rec, tmp_path / "none.txt")
    assert not (tmp_path / "none.txt").exists()


def test_indices_count_the_images_a_written_model_no_longer_holds(tmp_path):
    names = ["a.png", "b.png", "c.png", "d.png"]
    rec, _ = _model(names)
    rec.deregister_frame(rec.image(2).frame_id)
    (tmp_path / "model").mkdir()
    rec.write(tmp_path / "model")
    written = pycolmap.Reconstruction(tmp_path / "model")
    assert written.num_images() == 3  # pycolmap writes the registered images only
    assert [line.split()[0] for line in trajectory.tum_lines(written, all_names=names)] == ["0", "2", "3"]
    assert [line.split()[0] for line in trajectory.tum_lines(written)] == ["0", "1", "2"]  # shifted


def test_numerically_equal_timestamps_clash(tmp_path):
    rec, _ = _model(["1.png", "1.0.png", "2.png"])
    with pytest.raises(ValueError, match="the same timestamp"):
        trajectory.tum_lines(rec)
    # an Arabic-Indic digit is not a timestamp evo reads: name order
    assert trajectory.tum_timestamps(["\u0661.png", "2.png"]) == {"2.png": "0", "\u0661.png": "1"}


def test_coordinates_keep_every_digit(tmp_path):
    rec, _ = _model(["0.png"])
    image = rec.image(1)
    centre = np.array([4512345.678901, -1.0e-12, 3.0])
    rotation = image.cam_from_world().rotation
    image.frame.rig_from_world = pycolmap.Rigid3d(rotation, -(rotation.matrix() @ centre))
    [line] = trajectory.tum_lines(rec)
    written = [float(v) for v in line.split()[1:]]
    pose = image.cam_from_world().inverse()
    assert written == [*pose.translation, *pose.rotation.quat]  # the doubles themselves, no digit lost
    np.testing.assert_allclose(written[:3], centre, rtol=1e-12, atol=1e-8)


def test_a_rig_needs_one_cameras_images(tmp_path):
    names = ["cam0/100.png", "cam1/100.png", "cam0/101.png", "cam1/101.png"]
    rec, _ = _model(names)
    clash = r"cam0/100.png and cam1/100.png have the same timestamp 100.*--images"
    with pytest.raises(ValueError, match=clash):
        trajectory.tum_lines(rec)
    assert [line.split()[0] for line in trajectory.tum_lines(rec, "cam1/")] == ["100", "101"]
    with pytest.raises(ValueError, match="no image name starts with 'cam2/'"):
        trajectory.tum_lines(rec, "cam2/")
    rec, _ = _model(["cam0/frame_1.png", "cam1/frame_1.png"])  # a rig: frame numbers repeat
    with pytest.raises(ValueError, match="no frame number that differs per image.*--images cam0/"):
        trajectory.tum_lines(rec)
    rec, _ = _model(["cam0/frame_1.png", "cam1/frame_2.png"])  # registered: distinct; the run's: not
    everything = ["cam0/frame_1.png", "cam0/frame_2.png", "cam1/frame_1.png", "cam1/frame_2.png"]
    with pytest.raises(ValueError, match="in 2 folders"):
        trajectory.tum_lines(rec, all_names=everything)
    rec, _ = _model(["left/a.png", "right/a.png", "left/b.png"])  # no numbers: indices would interleave
    with pytest.raises(ValueError, match=r"in 2 folders \(left, right\) .*--images left/"):
        trajectory.tum_lines(rec)
    assert [line.split()[0] for line in trajectory.tum_lines(rec, "right/")] == ["0"]


def test_export_command_writes_the_trajectory(tmp_path, capsys):
    rec, _ = _model(["cam0/0.png", "cam0/1.png", "cam1/0.png"])
    project = tmp_path / "out"
    (project / "sparse" / "0").mkdir(parents=True)
    rec.write(project / "sparse" / "0")
    main(["export", str(project), "--format", "tum", "--images", "cam0/"])
    assert [row[0] for row in _read(project / "trajectory.txt")] == ["0", "1"]

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(project), *args])
        assert exit_info.value.code == 1
        return capsys.readouterr().err

    assert "have the same timestamp" in error("--format", "tum", "-o", str(tmp_path / "all.txt"))
    assert not (tmp_path / "all.txt").exists()
    assert "goes with --format tum" in error("--images", "cam0/", "-o", str(tmp_path / "p.ply"))
    assert "would write TUM data into" in error("--format", "tum", "-o", str(tmp_path / "t.ply"))
    assert "exists" in error("--format", "tum", "--images", "cam0/")
    assert "name it .txt" in error("--format", "tum", "-o", str(tmp_path / "t.glb"))
    main(["export", str(project), "-o", str(tmp_path / "auto.txt"), "--images", "cam1/"])  # .txt: TUM
    assert [row[0] for row in _read(tmp_path / "auto.txt")] == ["0"]
    (project / "sparse" / "0").rename(project / "sparse" / "1")  # a further model: beside, not inside
    (project / "sparse" / "0").mkdir()
    main(["export", str(project / "sparse" / "1"), "--format", "tum", "--images", "cam0/"])
    assert (project / "trajectory_1.txt").is_file() and not (
        project / "sparse" / "1" / "trajectory.txt"
    ).exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "trajectory.txt").write_text("")
    with pytest.raises(SystemExit):  # no model is said before the existing output
        main(["export", str(tmp_path / "empty"), "--format", "tum"])
    assert "no COLMAP model in" in capsys.readouterr().err


def test_export_counts_the_projects_unregistered_images_from_its_database(tmp_path, capsys):
    names = ["left.png", "middle.png", "right.png"]  # no numbers: timestamps are indices
    rec, _ = _model(names)
    rec.deregister_frame(rec.image(2).frame_id)  # middle.png
    project = tmp_path / "out"
    (project / "sparse" / "0").mkdir(parents=True)
    rec.write(project / "sparse" / "0")
    main(["export", str(project / "sparse" / "0"), "--format", "tum", "-o", str(tmp_path / "bare.txt")])
    assert "warning: the timestamps are the images' indices" in capsys.readouterr().err
    assert [row[0] for row in _read(tmp_path / "bare.txt")] == ["0", "1"]  # right.png shifted to 1
    (project / "database.db").write_text("not a database")
    main(["export", str(project), "--format", "tum", "-o", str(tmp_path / "garbage.txt")])
    assert "no database.db at" in capsys.readouterr().err  # a warning, not a traceback
    (project / "database.db").unlink()
    with pycolmap.Database.open(project / "database.db") as db:  # as reconstruct writes it: every image
        camera_id = db.write_camera(
            pycolmap.Camera(model="PINHOLE", width=64, height=48, params=[50, 50, 32, 24])
        )
        for name in names:
            db.write_image(pycolmap.Image(name=name, camera_id=camera_id))
    before = (project / "database.db").read_bytes()
    main(["export", str(project), "--format", "tum"])
    assert "warning" not in capsys.readouterr().err
    assert [row[0] for row in _read(project / "trajectory.txt")] == ["0", "2"]
    assert (project / "database.db").read_bytes() == before  # read only


def test_export_sees_the_rig_the_database_lists(tmp_path, capsys):
    """Registered cam0/frame_1 and cam1/frame_2 look like one camera; the database lists two cameras."""
    rec, _ = _model(["cam0/frame_1.png", "cam1/frame_2.png"])
    project = tmp_path / "out"
    (project / "sparse" / "0").mkdir(parents=True)
    rec.write(project / "sparse" / "0")
    with pycolmap.Database.open(project / "database.db") as db:
        camera_id = db.write_camera(
            pycolmap.Camera(model="PINHOLE", width=64, height=48, params=[50, 50, 32, 24])
        )
        for name in ["cam0/frame_1.png", "cam0/frame_2.png", "cam1/frame_1.png", "cam1/frame_2.png"]:
            db.write_image(pycolmap.Image(name=name, camera_id=camera_id))
    with pytest.raises(SystemExit):
        main(["export", str(project), "--format", "tum"])
    assert "in 2 folders" in capsys.readouterr().err and not (project / "trajectory.txt").exists()
    main(["export", str(project), "--format", "tum", "--images", "cam1/"])
    assert [row[0] for row in _read(project / "trajectory.txt")] == ["2"]
