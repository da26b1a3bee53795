"""The README figure: the demo reconstruction (cameras and points) rendered by ``speed3r_sfm.viz``.

    python benchmarks/make_readme_figure.py [--demo outputs/demo] [--output PNG]

Uses the project written by ``speed3r-sfm demo --output DEMO`` (runs the demo first when it is missing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from speed3r_sfm.viz import plot_reconstruction  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="outputs/demo", help="output folder of `speed3r-sfm demo`")
    parser.add_argument("--output", default="docs/figures/demo_reconstruction.png")
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args()
    project = Path(args.demo) / "reconstruction"
    if not (project / "sparse" / "0").is_dir():
        from speed3r_sfm.demo import demo_command

        demo_command(output=args.demo)
    fig = plot_reconstruction(
        project,
        views=("3d", "top"),
        title="speed3r-sfm demo: default model, 24 views, after bundle adjustment",
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=args.dpi)
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
