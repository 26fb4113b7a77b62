"""Building images on the host: ``bootkit build-image`` (root tree to GPT + ext4 disk to QCOW2)."""

from __future__ import annotations

from bootkit.host.image.build import BuildOptions, BuildResult, build_image

__all__ = ["BuildOptions", "BuildResult", "build_image"]
