"""attnlab.analysis: read what runs measured and explain it.

Reads files only (sweep JSON Lines, pytest-benchmark JSON) and never runs a kernel:
`load` -> DataFrame, `fits` (latency against context), `roofline` (share of the GPU's peak),
`claim` (an analytic serving model of output tokens/s against context), `charts` (seaborn),
`analyze` (all of these written to a folder), `report` (one self-contained HTML page and a
Markdown twin).

pandas, scipy and seaborn come with the `analysis` extra. Importing this package never needs
them; a function that does raises MissingExtra saying what to install.
"""
from __future__ import annotations

import importlib

from attnlab.analysis._deps import MissingExtra

# Names that are also module names (load, roofline, analyze) are left out: once the module is
# imported, the package attribute is the module. Import those from their modules.
_EXPORTS = {
    "Loaded": "load", "RESULT_SCHEMA": "load", "ENVIRONMENT_SCHEMA": "load",
    "fit_all": "fits", "fit_group": "fits", "fit_quadratic": "fits", "Fit": "fits", "write_fits": "fits",
    "GPU_SPECS": "roofline", "GpuSpec": "roofline", "match_gpu": "roofline", "gpu_spec": "roofline",
    "roofline_summary": "roofline",
    "MODEL_PRESETS": "claim", "ModelConfig": "claim", "ServingModel": "claim", "Calibration": "claim",
    "build_claim": "claim", "calibrate": "claim", "explain_claim": "claim", "CLAIM": "claim",
    "render_all": "charts", "Analysis": "analyze", "build_report": "report", "Report": "report",
}

__all__ = ["MissingExtra", *_EXPORTS]


def __getattr__(name):
    # Lazy, so `import attnlab.analysis` works without the extra and a missing package is
    # reported by the first function that needs it.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attnlab.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"attnlab.analysis.{_EXPORTS[name]}"), name)
