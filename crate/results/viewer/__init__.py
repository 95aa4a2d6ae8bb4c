"""The static neuron viewer: `build_viewer(ViewerConfig(inputs=[interp_dir]))` writes a folder that opens
from a local path (see `build.py` for its layout); `jobs/view.py` builds it and logs it to MLflow."""

from crate.results.viewer.build import ViewerConfig, build_viewer, run_viewer

__all__ = ["ViewerConfig", "build_viewer", "run_viewer"]
