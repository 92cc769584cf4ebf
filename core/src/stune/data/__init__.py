"""Datasets: configuration, discovery, image preparation, caches and batching."""
