"""The core's options, one light module per area (pydantic only; no torch).

``stune.config.CoreOptions`` inherits them all. Each area's implementation module (``stune.optim``,
``stune.validation``, …) reads its fields; cross-option checks live next to the fields they check.
"""
