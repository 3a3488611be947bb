"""Hybrid parallelism: one technique per file, applied to a single-device model from outside.

``parallelize.py`` is the one place that reads a :class:`~loom.parallel.plan.Plan` and applies the
techniques in a fixed order (pipeline split -> tensor parallel -> recompute -> data parallel/ZeRO).
"""
