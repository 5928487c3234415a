"""Parallelism applied to the plain models from outside: parallel dims + device mesh, then one file
per strategy (data parallel here; tensor, pipeline and context parallel follow)."""

from mmfm.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
