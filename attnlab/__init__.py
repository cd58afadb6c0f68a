"""attnlab: how attention cost grows from 1k to 128k tokens, measured kernel by kernel.

attnlab.kernels (implementations and API) -> attnlab.bench (measurement, records) ->
profiles/ (files) -> attnlab.analysis (fits, charts, reports); attnlab.cli wraps them.
"""
__version__ = "0.1.0"
