"""speed3r_sfm.viz: frusta geometry, figures, PLY/GLB export, the viser scene and the CLI commands."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys

import numpy as np
import pycolmap
import pytest
import torch

from speed3r_sfm import viz
from speed3r_sfm.cli import main
from speed3r_sfm.data.colmap_dataset import build_reconstruction


@pytest.fixture
def project(tmp_path):
    """A project folder (OUT/sparse/0) with 4 cameras on a circle looking at the origin and 200 points."""
    poses = []
    for angle in np.linspace(0, np.pi / 2, 4):
        center = np.array([3 * np.cos(angle), 0.0, 3 * np.sin(angle)])
        z = -center / np.linalg.norm(center)
        x = np.cross([0.0, 1.0, 0.0], z)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        rotation = np.stack([x, y, z])  # cam_from_world rotation: rows are the camera axes
        poses.append(np.concatenate([rotation, (-rotation @ center)[:, None]], 1))
    k = torch.tensor([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]]).expand(4, 3, 3)
    rec = build_reconstruction(k, torch.tensor(np.array(poses)), (48, 64), [f"{i}.png" for i in range(4)])
    rng = np.random.default_rng(0)
    for xyz in rng.uniform(-1, 1, (200, 3)):
        rec.add_point3D(xyz, pycolmap.Track(), rng.integers(0, 255, 3).astype(np.uint8))
    out = tmp_path / "project"
    (out / "sparse" / "0").mkdir(parents=True)
    rec.write(out / "sparse" / "0")
    return out


def test_load_and_frusta(project):
    rec = viz.load_reconstruction(project)
    assert viz.load_reconstruction(project / "sparse" / "0").num_images() == 4
    assert viz.load_reconstruction(rec) is rec
    with pytest.raises(FileNotFoundError):
        viz.load_reconstruction(project / "missing")
    frusta = viz.camera_frusta(rec, scale=1.0)
    assert [f.name for f in frusta] == ["0.png", "1.png", "2.png", "3.png"]
    first = frusta[0]
    np.testing.assert_allclose(first.center, [3, 0, 0], atol=1e-9)
    # corners lie one unit in front of the camera, towards the origin, symmetric about the optical axis
    np.testing.assert_allclose(first.corners[:, 0], 2.0, atol=1e-9)
    np.testing.assert_allclose(first.corners.mean(0), [2, 0, 0], atol=1e-9)
    assert first.fov_y == pytest.approx(2 * np.arctan(24 / 50))
    xyz, rgb = viz.point_cloud(rec, max_points=50)
    assert xyz.shape == (50, 3) and rgb.dtype == np.uint8


def test_figures(project):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    fig = viz.plot_reconstruction(project, views=("3d", "top", "side"))
    assert len(fig.axes) == 3
    depth = torch.rand(3, 12, 16) + 1
    fig = viz.plot_depth_maps(torch.rand(3, 3, 12, 16), depth, max_views=2)
    assert len(fig.axes) == 4


def test_export_ply_and_glb(project, tmp_path):
    ply = viz.export_ply(project, tmp_path / "a.ply")
    assert ply.read_bytes().startswith(b"ply")
    trimesh = pytest.importorskip("trimesh")
    main(["export", str(project), "-o", str(tmp_path / "a.glb")])
    scene = trimesh.load(tmp_path / "a.glb")
    clouds = [g for g in scene.geometry.values() if isinstance(g, trimesh.PointCloud)]
    assert len(clouds) == 1 and len(clouds[0].vertices) == 200
    assert len(scene.geometry) == 5  # the points and 4 camera frusta


def test_export_of_a_project_with_further_models_says_which_it_read(project, tmp_path, capsys):
    main(["export", str(project), "-o", str(tmp_path / "a.ply")])
    assert "further models" not in capsys.readouterr().err
    for index in (1, 10, 2):
        shutil.copytree(project / "sparse" / "0", project / "sparse" / str(index))
    (project / "sparse" / "3").mkdir()  # not a model
    main(["export", str(project), "-o", str(tmp_path / "b.ply")])
    note = f"note: {project} holds further models (sparse/1, sparse/2, sparse/10); this is sparse/0"
    assert note in capsys.readouterr().err
    main(["export", str(project / "sparse" / "1"), "-o", str(tmp_path / "c.ply")])
    assert "further models" not in capsys.readouterr().err


def test_export_without_output_writes_beside_a_model_folder_not_into_it(project, tmp_path):
    pytest.importorskip("trimesh")
    shutil.copytree(project / "sparse" / "0", project / "sparse" / "1")
    bare = tmp_path / "model"
    shutil.copytree(project / "sparse" / "0", bare)
    cases = {
        project: project / "points.glb",
        project / "sparse": project / "points.glb",
        project / "sparse" / "0": project / "points.glb",
        project / "sparse" / "1": project / "points_1.glb",
        bare: tmp_path / "model_points.glb",
    }
    for given, expected in cases.items():
        assert viz.default_export_path(given) == expected.resolve()
    folders = (bare, *project.glob("sparse/*"))
    models = {folder: sorted(p.name for p in folder.iterdir()) for folder in folders}
    for given in (project / "sparse" / "1", bare):
        main(["export", str(given)])
    assert (project / "points_1.glb").read_bytes().startswith(b"glTF")
    assert (tmp_path / "model_points.glb").read_bytes().startswith(b"glTF")
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in models} == models


def test_export_refuses_a_suffix_it_cannot_read_as_a_format(project, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(project), "-o", str(tmp_path / "points.xyz")])
    assert exit_info.value.code == 1 and "name it .ply, .glb or .txt" in capsys.readouterr().err
    assert not (tmp_path / "points.xyz").exists()
    main(["export", str(project), "-o", str(tmp_path / "points.xyz"), "--format", "ply"])
    assert (tmp_path / "points.xyz").read_bytes().startswith(b"ply")


def test_missing_dependency_says_what_to_install(monkeypatch, project, capsys):
    monkeypatch.setitem(sys.modules, "viser", None)  # import viser -> ImportError
    with pytest.raises(viz.MissingDependencyError, match=r"speed3r-sfm\[viz\]"):
        viz.require("viser", "speed3r-sfm view")
    with pytest.raises(SystemExit) as exit_info:
        main(["view", str(project)])
    assert exit_info.value.code == 1
    assert 'pip install "speed3r-sfm[viz]"' in capsys.readouterr().err


def test_viser_scene(project):
    viser = pytest.importorskip("viser")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)
    try:
        handles = viz.build_scene(server, project)
        assert len(handles["cameras"]) == 4
        assert handles["points"].points.shape == (200, 3)
        first = handles["cameras"][0]
        np.testing.assert_allclose(first.position, [3, 0, 0], atol=1e-6)
        # viser frusta look along their +z (OpenCV): the first camera's +z is world -x
        rotation = pycolmap.Rotation3d(np.array([*first.wxyz[1:], first.wxyz[0]])).matrix()
        np.testing.assert_allclose(rotation[:, 2], [-1, 0, 0], atol=1e-6)
    finally:
        server.stop()


def test_export_protects_existing_files_and_the_model(project, tmp_path, capsys):
    def export(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(project), *args])
        return exit_info.value.code, capsys.readouterr().err

    model_file = project / "sparse" / "0" / "points3D.bin"
    before = model_file.read_bytes()
    code, err = export("-o", str(model_file), "--format", "ply", "--overwrite", "true")
    assert code == 1 and "is a file of the model being exported" in err and model_file.read_bytes() == before
    code, err = export("-o", str(tmp_path / "x.ply"), "--format", "glb")
    assert code == 1 and "would write GLB data into" in err and not (tmp_path / "x.ply").exists()
    code, err = export("-o", str(tmp_path), "--format", "ply")
    assert code == 1 and "is a folder" in err
    (tmp_path / "old.ply").write_text("keep")
    code, err = export("-o", str(tmp_path / "old.ply"))
    assert code == 1 and "exists" in err and (tmp_path / "old.ply").read_text() == "keep"
    main(["export", str(project), "-o", str(tmp_path / "old.ply"), "--overwrite", "true"])
    assert (tmp_path / "old.ply").read_bytes().startswith(b"ply")
    # the default output (PROJECT/points.glb) is refreshed with --overwrite; sparse/ names the model too
    pytest.importorskip("trimesh")
    main(["export", str(project)])
    main(["export", str(project / "sparse"), "-o", str(project / "points.glb"), "--overwrite", "true"])
    assert (project / "points.glb").read_bytes().startswith(b"glTF")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "n.ply")])
    assert exit_info.value.code == 1 and "nowhere does not exist" in capsys.readouterr().err


def test_glb_is_in_gltf_axes(project, tmp_path):
    """glTF is Y-up: COLMAP's (x, y, z) is written as (x, -y, -z)."""
    trimesh = pytest.importorskip("trimesh")
    viz.export_glb(project, tmp_path / "a.glb")
    scene = trimesh.load(tmp_path / "a.glb")
    cloud = next(g for g in scene.geometry.values() if isinstance(g, trimesh.PointCloud))
    xyz, _ = viz.point_cloud(viz.load_reconstruction(project))
    np.testing.assert_allclose(np.sort(cloud.vertices[:, 1]), np.sort(-xyz[:, 1]), atol=1e-5)
    np.testing.assert_allclose(np.sort(cloud.vertices[:, 2]), np.sort(-xyz[:, 2]), atol=1e-5)


def test_view_checks_its_arguments_and_reports_the_port_it_serves_on(project, monkeypatch, capsys):
    pytest.importorskip("viser")
    for args, message in (
        (["--port", "99999"], "port must lie in 1-65535"),
        (["--port", "-1"], "port must lie in 1-65535"),
        (["--max_points", "0"], "max_points must be at least 1"),
        (["--host", "203.0.113.7"], "cannot serve on host '203.0.113.7'"),  # not an address of this machine
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["view", str(project), *args])
        assert exit_info.value.code == 1 and message in capsys.readouterr().err

    def stop(seconds):
        raise KeyboardInterrupt  # Ctrl-C at once

    monkeypatch.setattr("time.sleep", stop)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert viz.view_command(str(project), port=port) == 0
    out = capsys.readouterr().out
    served = int(out.split("http://127.0.0.1:")[1].split()[0])
    assert served != port and f"(port {port} was taken)" in out
    # SIGTERM stops it as Ctrl-C does (pycolmap's crash handler printed a stack trace), then is restored
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr("time.sleep", lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    assert viz.view_command(str(project)) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_export_into_an_unwritable_place_names_the_output(project, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    target = tmp_path / "notes.txt" / "points.ply"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(project), "-o", str(target)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"error: cannot write {target}" in err and ".tmp-" not in err
    assert "Traceback" not in err and (tmp_path / "notes.txt").read_text() == "a file, not a folder"
