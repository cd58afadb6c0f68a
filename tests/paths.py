"""Where the tests find the repository and its data, wherever the test file sits."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample_run"      # a small run made by its make_sample.py
PROFILES = ROOT / "profiles"                           # the committed measurements
