"""Seeing inside a trained run: the per-run HTML report, the leaderboard across runs, and the figures
they are made of (saliency, filters and feature maps, attention rollout, hidden states, features, and the
predictions: confusion, mistakes, calibration).

Every figure function here returns a matplotlib Figure (drawn with `mnistlab.plots.pyplot()`); those that
look inside a model take it in eval mode on the CPU and uint8 images (N, 28, 28) with the run's mean and
std, those of predictions.py take logits or probabilities. The report turns figures into inline PNGs
with `mnistlab.plots.figure_png`. What writes into a run folder: `mnistlab report` (report.html, unless -o
says elsewhere) and `mnistlab compare`'s grid, which trains its runs (each with a train.log); the figures
and the leaderboard only read runs.
"""
