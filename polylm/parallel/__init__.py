"""Tensor parallelism: the plan (`plan`), rank 0 driving the other ranks (`driver`) and starting a job
(`launch`). `follow` and `release` are what a program running its own ranks calls."""

from .driver import follow, release

__all__ = ["follow", "release"]
