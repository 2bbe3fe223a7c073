"""Seeing inside a trained run: the per-run HTML report, the leaderboard across runs, and the figures
they are made of (saliency, filters and feature maps, attention rollout, hidden states, features).

Every figure function here takes a model in eval mode on the CPU and uint8 images (N, 28, 28) with the
run's mean and std, and returns a matplotlib Figure (drawn with `mnistlab.plots.pyplot()`); the report
turns figures into inline PNGs with `mnistlab.plots.figure_png`. Nothing here writes to the run folder.
"""
