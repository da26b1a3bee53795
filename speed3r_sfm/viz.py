"""Looking at a COLMAP project: matplotlib figures, PLY/GLB (and trajectory) export and a viser viewer.

    fig = plot_reconstruction("outputs/demo/reconstruction")      # cameras (frusta) and coloured points
    fig = plot_depth_maps(images, depths)                           # images above their depth maps
    export_glb(rec, "scene.glb"); export_ply(rec, "scene.ply")      # GLB needs trimesh
    speed3r-sfm view OUT                                            # viser viewer (needs viser)
    speed3r-sfm export OUT -o scene.glb                             # or .ply; --format tum: the trajectory

matplotlib, trimesh and viser are optional (``pip install "speed3r-sfm[viz]"``); each is imported only by
the function that needs it, and a missing one raises :class:`MissingDependencyError` saying what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycolmap

from .fileio import written_atomically
from .trajectory import timestamp_rule, write_tum

INSTALL_HINT = 'pip install "speed3r-sfm[viz]"'


class MissingDependencyError(ImportError):
    """An optional visualisation dependency is not installed."""


def require(module: str, feature: str) -> Any:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{feature} needs the optional package {module!r}: {INSTALL_HINT}"
        ) from error


def load_reconstruction(project: str | os.PathLike | pycolmap.Reconstruction) -> pycolmap.Reconstruction:
    """A reconstruction from a project folder (OUT with sparse/0), a model folder, or as it is."""
    if isinstance(project, pycolmap.Reconstruction):
        return project
    path = Path(project)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a project folder (reconstruct OUT) or a model")
    candidate = model_folder(path)
    if candidate is not None:
        return pycolmap.Reconstruction(str(candidate))
    raise FileNotFoundError(
        f"no COLMAP model in {path} (looked for sparse/0, sparse, 0 and the folder itself)"
    )


def other_models_note(project: str | os.PathLike | pycolmap.Reconstruction) -> str | None:
    """For a project folder with further models (sparse/1, ...): which model a command reads and how to
    read another; None otherwise."""
    if isinstance(project, pycolmap.Reconstruction):
        return None
    path = Path(project)
    if model_folder(path) != path / "sparse" / "0":
        return None
    others = sorted(
        (
            p
            for p in (path / "sparse").iterdir()
            if p.name.isdigit() and p.name != "0" and model_folder(p) == p
        ),
        key=lambda p: int(p.name),
    )
    if not others:
        return None
    names = ", ".join(f"sparse/{p.name}" for p in others)
    example = path / "sparse" / others[0].name
    return f"{path} holds further models ({names}); this is sparse/0 (pass e.g. {example} for another)"


def model_folder(path: Path) -> Path | None:
    """The folder of a COLMAP model in or at ``path`` (a project, its sparse/ or sparse/0), or None."""
    for candidate in (path / "sparse" / "0", path / "sparse", path / "0", path):
        if (candidate / "images.bin").exists() or (candidate / "images.txt").exists():
            return candidate
    return None


@dataclass
class Frustum:
    """One registered image: camera centre, the 4 image-corner points at ``scale`` depth (world) and its
    world-from-camera rotation (3, 3)."""

    name: str
    center: np.ndarray
    corners: np.ndarray
    world_from_cam: np.ndarray
    fov_y: float
    aspect: float


def scene_scale(rec: pycolmap.Reconstruction) -> float:
    """A length for frusta and point sizes: the median distance of the camera centres to their mean."""
    centers = np.array([im.projection_center() for im in rec.images.values() if im.has_pose])
    if len(centers) < 2:
        return 1.0
    spread = float(np.median(np.linalg.norm(centers - centers.mean(0), axis=1)))
    return spread if spread > 1e-9 else 1.0


def camera_frusta(rec: pycolmap.Reconstruction, scale: float | None = None) -> list[Frustum]:
    """A :class:`Frustum` per registered image, sorted by name (``scale`` default: 0.15 x scene scale)."""
    scale = 0.15 * scene_scale(rec) if scale is None else scale
    frusta = []
    for image in sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name):
        camera = rec.cameras[image.camera_id]
        k_inv = np.linalg.inv(camera.calibration_matrix())
        w, h = camera.width, camera.height
        pixels = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64)
        rays = pixels @ k_inv.T  # camera coordinates at z = 1
        world_from_cam = image.cam_from_world().inverse().matrix()
        rotation, center = world_from_cam[:, :3], world_from_cam[:, 3]
        corners = (scale * rays) @ rotation.T + center
        fy = camera.calibration_matrix()[1, 1]
        frusta.append(Frustum(image.name, center, corners, rotation, 2 * np.arctan(h / (2 * fy)), w / h))
    return frusta


def point_cloud(rec: pycolmap.Reconstruction, max_points: int | None = None, seed: int = 0):
    """(N, 3) float64 positions and (N, 3) uint8 colours of the 3D points (a random subset above
    ``max_points``); points without colour (all black) are coloured by height."""
    if rec.num_points3D() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8)
    points = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in points], dtype=np.float64)
    rgb = np.array([p.color for p in points], dtype=np.uint8)
    if max_points is not None and len(xyz) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(xyz), max_points, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    if not rgb.any():
        rgb = _height_colours(xyz)
    return xyz, rgb


def _height_colours(xyz: np.ndarray) -> np.ndarray:
    """A blue-to-yellow ramp along the axis of largest spread (no matplotlib needed)."""
    axis = int(np.argmax(xyz.std(0))) if len(xyz) else 0
    t = xyz[:, axis] - xyz[:, axis].min()
    t = t / max(float(t.max()), 1e-12)
    low, high = np.array([40, 60, 200.0]), np.array([250, 220, 40.0])
    return (low + t[:, None] * (high - low)).astype(np.uint8)


# ---------------------------------------------------------------------------------------- matplotlib


def _frustum_lines(f: Frustum) -> list[np.ndarray]:
    c = f.corners
    lines = [np.stack([f.center, corner]) for corner in c]
    lines.append(np.concatenate([c, c[:1]]))
    return lines


def plot_reconstruction(
    project: str | os.PathLike | pycolmap.Reconstruction,
    views: tuple[Literal["3d", "top", "side"], ...] = ("3d", "top"),
    max_points: int = 20_000,
    frustum_scale: float | None = None,
    point_size: float = 2.0,
    title: str | None = None,
):
    """A matplotlib figure of the cameras (frusta, first in red) and the coloured points, one panel per
    entry of ``views``: "3d" (perspective), "top" (the two axes of largest camera spread) or "side"."""
    plt = require("matplotlib.pyplot", "plot_reconstruction")
    rec = load_reconstruction(project)
    xyz, rgb = point_cloud(rec, max_points)
    frusta = camera_frusta(rec, frustum_scale)
    centers = np.array([f.center for f in frusta]) if frusta else np.zeros((0, 3))
    # plane axes from the camera positions (or points): "top" = the two largest principal directions
    basis_source = centers if len(centers) >= 3 else xyz
    mean = basis_source.mean(0) if len(basis_source) else np.zeros(3)
    _, _, vt = (
        np.linalg.svd(basis_source - mean, full_matrices=False)
        if len(basis_source) >= 3
        else (
            None,
            None,
            np.eye(3),
        )
    )
    fig = plt.figure(figsize=(5.0 * len(views), 4.6))
    colours = rgb / 255.0
    for i, view in enumerate(views):
        if view == "3d":
            ax = fig.add_subplot(1, len(views), i + 1, projection="3d")
            ax.scatter(*xyz.T, c=colours, s=point_size, linewidths=0, depthshade=False)
            for j, f in enumerate(frusta):
                for line in _frustum_lines(f):
                    ax.plot(*line.T, color="red" if j == 0 else "black", linewidth=0.7)
            _equal_3d(ax, np.concatenate([xyz, centers]) if len(centers) else xyz)
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.set_zlabel("z")
            ax.set_title("cameras and points")
        else:
            axes = (vt[0], vt[1]) if view == "top" else (vt[0], vt[2])
            ax = fig.add_subplot(1, len(views), i + 1)
            project2d = np.stack(axes, 1)  # (3, 2)
            ax.scatter(*((xyz - mean) @ project2d).T, c=colours, s=point_size, linewidths=0)
            for j, f in enumerate(frusta):
                for line in _frustum_lines(f):
                    ax.plot(*((line - mean) @ project2d).T, color="red" if j == 0 else "black", linewidth=0.7)
            shown = (np.concatenate([xyz, centers]) - mean) @ project2d
            if len(shown):
                low, high = np.percentile(shown, 1, axis=0), np.percentile(shown, 99, axis=0)
                pad = 0.08 * (high - low).max()
                ax.set_xlim(low[0] - pad, high[0] + pad)
                ax.set_ylim(low[1] - pad, high[1] + pad)
            ax.set_aspect("equal", adjustable="box")
            ax.set_title("top view" if view == "top" else "side view")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"{len(frusta)} cameras, {rec.num_points3D()} points")
    fig.tight_layout()
    return fig


def _equal_3d(ax, xyz: np.ndarray) -> None:
    if len(xyz) == 0:
        return
    low, high = np.percentile(xyz, 1, axis=0), np.percentile(xyz, 99, axis=0)
    center, radius = (low + high) / 2, float((high - low).max()) / 2 or 1.0
    ax.set_xlim(center[0] - radius, center[0] + radius)
    ax.set_ylim(center[1] - radius, center[1] + radius)
    ax.set_zlim(center[2] - radius, center[2] + radius)


def _numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def plot_depth_maps(
    images: Any, depths: Any, max_views: int = 4, titles: list[str] | None = None, cmap="turbo"
):
    """Images (S, 3, H, W) in [0, 1] or (S, H, W, 3) above their depth maps (S, H, W), ``max_views`` evenly
    spaced views; torch tensors or arrays. Returns the matplotlib figure."""
    plt = require("matplotlib.pyplot", "plot_depth_maps")
    images, depths = _numpy(images), _numpy(depths)
    if images.ndim == 4 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    s = len(depths)
    picks = np.unique(np.linspace(0, s - 1, min(max_views, s)).round().astype(int))
    fig, axes = plt.subplots(2, len(picks), figsize=(2.6 * len(picks), 4.4), squeeze=False)
    for col, i in enumerate(picks):
        image = images[i]
        axes[0, col].imshow(np.clip(image, 0, 1) if image.dtype != np.uint8 else image)
        axes[0, col].set_title(titles[i] if titles else f"view {i}", fontsize=9)
        depth = depths[i]
        valid = depth[np.isfinite(depth) & (depth > 0)]
        vmin, vmax = (np.percentile(valid, 2), np.percentile(valid, 98)) if valid.size else (0, 1)
        axes[1, col].imshow(depth, cmap=cmap, vmin=vmin, vmax=vmax)
        for row in range(2):
            axes[row, col].axis("off")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- export


def export_ply(project: str | os.PathLike | pycolmap.Reconstruction, path: str | os.PathLike) -> Path:
    """The 3D points as a PLY file (pycolmap's writer), written to a temporary file and moved into place."""
    rec = load_reconstruction(project)
    with written_atomically(path) as tmp:
        rec.export_PLY(str(tmp))
    return Path(path)


# glTF is Y-up with the camera looking along -Z; COLMAP's cameras look along +Z with +Y down: a half turn
# about X shows a scene upright whose first camera was held level
COLMAP_TO_GLTF = np.diag([1.0, -1.0, -1.0])


def export_glb(
    project: str | os.PathLike | pycolmap.Reconstruction,
    path: str | os.PathLike,
    cameras: bool = True,
    frustum_scale: float | None = None,
) -> Path:
    """The coloured points and (``cameras``) the camera frusta as line sets, in a binary glTF file, in glTF's
    axes (:data:`COLMAP_TO_GLTF` applied to COLMAP's world coordinates)."""
    trimesh = require("trimesh", "GLB export")
    rec = load_reconstruction(project)
    xyz, rgb = point_cloud(rec)
    scene = trimesh.Scene()
    if len(xyz):
        colours = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1)
        scene.add_geometry(trimesh.PointCloud(xyz @ COLMAP_TO_GLTF.T, colors=colours), geom_name="points")
    if cameras:
        for f in camera_frusta(rec, frustum_scale):
            vertices = np.concatenate([f.center[None], f.corners]) @ COLMAP_TO_GLTF.T
            edges = [[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]]
            entities = [trimesh.path.entities.Line(e) for e in edges]
            scene.add_geometry(trimesh.path.Path3D(entities, vertices), geom_name=f"camera_{f.name}")
    if not scene.geometry:
        raise ValueError("the reconstruction has no points and no cameras to export")
    data = scene.export(file_type="glb")
    with written_atomically(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _model_files(project: str | os.PathLike) -> list[Path]:
    """The files of the COLMAP model a project (or model folder) is read from."""
    folder = model_folder(Path(project))
    if folder is None:
        return []
    parts = ("cameras", "images", "points3D", "rigs", "frames")
    files = [folder / f"{part}.{ext}" for part in parts for ext in ("bin", "txt")]
    return [path.resolve() for path in files if path.is_file()]


def default_export_path(project: Path, filename: str = "points.glb") -> Path:
    """Where ``export`` writes without ``-o``: PROJECT/``filename`` (``points_N.glb`` for the further model
    sparse/N), beside a bare model folder (``MODEL_points.glb``); never into a model folder, whose files
    COLMAP tools read as the model."""
    folder = model_folder(project)
    if folder is None:
        return project / filename
    folder = folder.resolve()
    if folder.parent.name == "sparse":  # OUT/sparse/N, given as OUT, OUT/sparse or OUT/sparse/N
        name = Path(filename)
        further = f"{name.stem}_{folder.name}{name.suffix}"
        return _project_root(folder) / (filename if folder.name == "0" else further)
    if folder.name == "sparse" or folder != project.resolve():  # OUT/sparse or OUT/0
        return _project_root(folder) / filename
    return _project_root(folder) / f"{folder.name}_{filename}"


def _project_root(folder: Path) -> Path:
    """The folder holding the model folder ``folder`` (resolved): OUT for OUT/sparse/N, OUT/sparse, OUT/0."""
    return folder.parent.parent if folder.parent.name == "sparse" else folder.parent


def project_database(project: Path) -> Path:
    """The database.db of the project PROJECT is or holds (it may not exist)."""
    return _project_root((model_folder(project) or project).resolve()) / "database.db"


def database_image_names(database: Path) -> list[str] | None:
    """Every image name of a COLMAP database (a ``reconstruct`` run's: registered or not), read without
    writing to it; None if it is missing or not one."""
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return [name for (name,) in db.execute("SELECT name FROM images")]
    except (sqlite3.Error, ValueError):
        return None


EXPORT_FILENAMES = {"glb": "points.glb", "ply": "points.ply", "tum": "trajectory.txt"}
EXPORT_SUFFIXES = {".glb": "glb", ".ply": "ply", ".txt": "tum"}


def export_command(
    project: str,
    output: str | None = None,
    format: Literal["auto", "ply", "glb", "tum"] = "auto",
    images: str = "",
    overwrite: bool = False,
) -> int:
    """Export the points (and, in GLB, the camera frusta) or the camera trajectory of the COLMAP project
    PROJECT.

    Args:
        project: project folder (OUT of ``speed3r-sfm reconstruct``) or a COLMAP model folder.
        output: file to write; -o for short. Default: PROJECT/points.glb (trajectory.txt with --format tum);
            for a model folder, beside it, never inside it (OUT/sparse/1: OUT/points_1.glb; MODEL:
            MODEL_points.glb).
        format: "ply" (points), "glb" (points and cameras), "tum" (the camera trajectory as TUM RGB-D text,
            for evo: timestamp tx ty tz qx qy qz qw; speed3r_sfm.trajectory) or "auto" (from the output
            suffix: .ply, .glb or .txt for tum); a .ply or .glb suffix must agree with it.
        images: --format tum: only the images whose name starts with this (one camera of a rig: cam0/, with
            its slash, or cam0 also takes cam01/).
        overwrite: replace an existing output file (never a file of the model itself).
    """
    kind = "glb" if format == "auto" and not output else format
    output_path = Path(output) if output else default_export_path(Path(project), EXPORT_FILENAMES[kind])
    suffix = output_path.suffix.lower()
    problem = None
    if model_folder(Path(project)) is None:
        try:
            load_reconstruction(project)  # says why
        except FileNotFoundError as error:
            problem = str(error)
    elif kind == "auto" and suffix not in EXPORT_SUFFIXES:
        problem = (
            f"cannot tell the format of {output_path} from its suffix: name it .ply, .glb or .txt (a TUM "
            "trajectory), or pass --format ply|glb|tum"
        )
    elif kind == "auto":
        kind = EXPORT_SUFFIXES[suffix]
    elif suffix in (".ply", ".glb") and suffix[1:] != kind:
        right = Path(EXPORT_FILENAMES[kind]).suffix
        problem = f"--format {kind} would write {kind.upper()} data into {output_path}; name it {right}"
    if problem is None and images and kind != "tum":
        problem = "--images selects the images of a trajectory: it goes with --format tum"
    if problem is None and output_path.is_dir():
        example = output_path / EXPORT_FILENAMES[kind]
        problem = f"output {output_path} is a folder; give a file path, e.g. {example}"
    elif problem is None and output_path.exists():
        if output_path.resolve() in _model_files(project):
            problem = f"output {output_path} is a file of the model being exported; choose another path"
        elif not overwrite:
            problem = f"output {output_path} exists; choose another path or pass --overwrite true"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        rec = load_reconstruction(project)
        if rec.num_points3D() == 0 and kind != "tum":
            what = "the PLY holds no point" if kind == "ply" else "only the cameras are exported"
            print(f"warning: {project} has no 3D points; {what}", file=sys.stderr)
        if kind == "tum":
            database = project_database(Path(project))
            every = database_image_names(database)  # the run's images; the model holds the registered ones
            names = [image.name for image in rec.images.values() if image.name.startswith(images)]
            if every is None and timestamp_rule(names) == "index":
                print(
                    f"warning: the timestamps are the images' indices in name order among the {len(names)} "
                    "of the model, which holds the registered images only: one not registered shifts the "
                    f"later ones, and no database.db at {database} lists them; name the frames with numbers",
                    file=sys.stderr,
                )
            written = write_tum(rec, output_path, images, every)
        else:
            written = export_ply(rec, output_path) if kind == "ply" else export_glb(rec, output_path)
        if note := other_models_note(project):
            print(f"note: {note}", file=sys.stderr)
    except (FileNotFoundError, MissingDependencyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the output's folder cannot be created or written
        print(f"error: cannot write {output_path}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


# ---------------------------------------------------------------------------------------- viser


def build_scene(
    server: Any,
    project: str | os.PathLike | pycolmap.Reconstruction,
    max_points: int = 200_000,
    frustum_scale: float | None = None,
    point_size: float | None = None,
) -> dict[str, Any]:
    """Add the points and camera frusta of a reconstruction to a ``viser.ViserServer``; returns the handles
    ({"points": handle, "cameras": [handles]})."""
    rec = load_reconstruction(project)
    xyz, rgb = point_cloud(rec, max_points)
    scale = scene_scale(rec)
    handles: dict[str, Any] = {"points": None, "cameras": []}
    if len(xyz):
        handles["points"] = server.scene.add_point_cloud(
            "/points",
            points=xyz.astype(np.float32),
            colors=rgb,
            point_size=point_size if point_size is not None else 0.004 * scale,
        )
    for f in camera_frusta(rec, frustum_scale):
        quat_xyzw = pycolmap.Rotation3d(f.world_from_cam).quat
        wxyz = (quat_xyzw[3], quat_xyzw[0], quat_xyzw[1], quat_xyzw[2])
        handles["cameras"].append(
            server.scene.add_camera_frustum(
                f"/cameras/{f.name}",
                fov=float(f.fov_y),
                aspect=float(f.aspect),
                scale=0.15 * scale if frustum_scale is None else frustum_scale,
                wxyz=wxyz,
                position=tuple(float(v) for v in f.center),
            )
        )
    return handles


def view_command(project: str, host: str = "127.0.0.1", port: int = 8080, max_points: int = 200_000) -> int:
    """Open a viser viewer of the COLMAP project PROJECT (cameras and points); stop with Ctrl-C.

    Args:
        project: project folder (OUT of ``speed3r-sfm reconstruct``) or a COLMAP model folder.
        host: address to serve on.
        port: port to serve on (open http://HOST:PORT in a browser).
        max_points: points shown at most (a random subset above).
    """
    import signal
    import socket
    import time

    try:
        if not 1 <= port <= 65535:
            raise ValueError(f"port must lie in 1-65535, got {port}")
        if max_points < 1:
            raise ValueError(f"max_points must be at least 1, got {max_points}")
        try:  # an address of this machine: bind a probe socket to it (any port)
            family = socket.getaddrinfo(host, None)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
        except (OSError, UnicodeError) as error:
            why = getattr(error, "strerror", None) or error
            message = f"cannot serve on host {host!r} ({why}); use e.g. 127.0.0.1 or 0.0.0.0"
            raise ValueError(message) from error
        viser = require("viser", "speed3r-sfm view")
        rec = load_reconstruction(project)
    except (FileNotFoundError, MissingDependencyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    server = viser.ViserServer(host=host, port=port, verbose=False)
    build_scene(server, rec, max_points)
    served = server.get_port()  # viser moves to the next free port if this one is taken

    def stop(signum, frame):  # SIGTERM (e.g. `timeout`, a service manager) stops as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)  # replaces the crash handler pycolmap's glog installs
    moved = f" (port {port} was taken)" if served != port else ""
    print(f"viewer of {project} at http://{host}:{served}{moved} (Ctrl-C to stop)")
    if note := other_models_note(project):
        print(f"note: {note}", file=sys.stderr)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    return 0
