"""Make a pose-stage export (``train_default.py pose``) runnable by ``reconstruct`` as a candidate default.

The pose stage exports dense weights without the shipped sidecar's pipeline keys. This writes them as the
shipped default is written (GSA config with the gates at their init, match descriptors from aggregator layer
3, ``pipeline_attention`` / ``gsa_from_views`` / ``gsa_guidance`` copied from the shipped sidecar), with the
input width the candidate was trained at, so that the harnesses can run it by path::

    python benchmarks/pose_candidate.py RUN/pose_dense.safetensors outputs/cand/model.safetensors --width 224
    python benchmarks/pipeline_synthetic.py --methods default outputs/cand/model.safetensors ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speed3r_sfm.training.backbone import (  # noqa: E402
    BackboneSpec,
    export_weights,
    inherit_pipeline_settings,
    load_exported,
    sidecar,
)

SHIPPED = REPO / "speed3r_sfm" / "weights" / "default.safetensors"


def write_candidate(source: Path, target: Path, width: int) -> Path:
    """Write ``source`` (a pose-stage export) to ``target`` with the shipped sidecar's pipeline settings
    and descriptor layer, at input width ``width``."""
    shipped = json.loads(sidecar(SHIPPED).read_text())
    model = load_exported(source, attention=shipped["config"]["attention"])
    model.config.descriptor_layer = None  # taken from the shipped sidecar
    pipeline = inherit_pipeline_settings(SHIPPED, model)
    pipeline["preprocessing"] = {**pipeline["preprocessing"], "target_size": width}
    target.parent.mkdir(parents=True, exist_ok=True)
    info = {"candidate_of": str(source)}
    spec = BackboneSpec(name="vggt", preset="small")
    return export_weights(model, spec, target, "float16", info, pipeline=pipeline)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="pose_dense.safetensors of a pose-stage run")
    parser.add_argument("target", type=Path)
    parser.add_argument("--width", type=int, required=True, help="the input width it was trained at")
    args = parser.parse_args()
    print(write_candidate(args.source, args.target, args.width))


if __name__ == "__main__":
    main()
