"""Training, fine-tuning and distillation of the backbones with Lightning.

- :mod:`.losses`: VGGT and π³ losses and ground-truth normalisation.
- :mod:`.distill`: distillation of a GSA student from a frozen dense teacher.
- :mod:`.module`: :class:`ReconstructionModule` (LightningModule).
- :mod:`.data`: :class:`ReconstructionDataModule` (synthetic on-device rendering, COLMAP datasets,
  HDF5 frame cache, variable views per batch, view-consistent augmentation).
- :mod:`.backbone`: building, loading and exporting backbones.
- :mod:`.cli`: ``fit_main`` (LightningCLI); :mod:`.runner`: the same configs without jsonargparse.

Submodules import Lightning; import them directly (``from speed3r_sfm.training.module import ...``).
"""
