"""`mnistlab report RUN_DIR`: one self-contained HTML page of what a run learned.

Built from the run folder alone (config.json, env.json, metrics.jsonl, results.json, the checkpoint)
and the dataset its config names. Every image is an inline PNG and the style sheet is inline, with no
script and no link outside the file, so the page opens from disk on a machine without a network.

Each section is one function `(Context) -> Section | None`: None where it does not apply to this run
(attention maps for a ViT only, hidden states for recurrent models only, ...). The model is evaluated
once on the validation and test splits, on plain views (no test-time augmentation, whatever the run
used for results.json: the report says so where the two differ).
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.errors import UserError
from mnistlab.plots import figure_png, pyplot

REPORT = "report.html"
SAMPLE_SIZE = 8  # images for saliency, attention and hidden states: the first test image of each class, in order
MISTAKES = 36
TYPICAL_PER_CLASS = 8


@dataclass
class Section:
    id: str  # the HTML anchor; tests look sections up by it
    title: str
    body: str


@dataclass
class Context:
    """What the sections share: the run's files, its model, and its predictions on val and test."""

    run_dir: Path
    config: dict[str, Any]
    env: dict[str, Any] | None
    results: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    meta: dict[str, Any]
    model: Any  # torch nn.Module (torch engine) or the scratch engine's numpy model
    classes: list[str]
    mean: float
    std: float
    val_images: torch.Tensor  # (Nv, 28, 28) uint8
    val_labels: torch.Tensor  # (Nv,) int64
    test_images: torch.Tensor  # (Nt, 28, 28) uint8
    test_labels: torch.Tensor  # (Nt,) int64
    val_logits: torch.Tensor | None = None  # (Nv, K) float32, plain views
    test_logits: torch.Tensor | None = None  # (Nt, K)
    test_features: np.ndarray | None = None  # (Nt, D) penultimate features, from the same pass as test_logits
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def is_torch(self) -> bool:
        return isinstance(self.model, torch.nn.Module)

    def sample(self) -> torch.Tensor:
        """Indices of the fixed sample: the first test image of each class (then the next ones), SAMPLE_SIZE."""
        picked: list[int] = []
        labels = self.test_labels.tolist()
        for c in range(len(self.classes)):
            if c in labels:
                picked.append(labels.index(c))
        rest = [i for i in range(len(labels)) if i not in set(picked)]
        return torch.tensor((picked + rest)[:SAMPLE_SIZE])


# ----------------------------------------------------------------------------------------------- html pieces

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(fig, alt: str, dpi: int = 90) -> str:
    """A figure as an inline PNG <img> (the figure is closed)."""
    data = base64.b64encode(figure_png(fig, dpi=dpi)).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None, cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def caption(text: str) -> str:
    return f'<p class="caption">{text}</p>'


# ----------------------------------------------------------------------------------------------- the context

def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None


@torch.inference_mode()
def _logits(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float, batch: int = 1000) -> torch.Tensor:
    """(N, K) float32 logits of uint8 images (N, 28, 28), plain views, in batches."""
    from mnistlab.data.batches import to_input

    out = [model(to_input(images[i : i + batch], mean, std)).float() for i in range(0, len(images), batch)]
    return torch.cat(out)


def load_context(run_dir: Path) -> Context:
    """Read the run folder and its dataset; evaluate the model once on validation and test."""
    from mnistlab.config import TrainConfig
    from mnistlab.data.dataset import load_dataset
    from mnistlab.run import METRICS, RESULTS, read_metrics
    from mnistlab.train import load_run_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    model, meta = load_run_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(meta["config"], source=f"{run_dir}: the checkpoint's config")
    metrics = read_metrics(run_dir / METRICS)
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    ctx = Context(run_dir=run_dir, config=meta["config"], env=_read_json(run_dir / "env.json"),
                  results=_read_json(run_dir / RESULTS), metrics=metrics, meta=meta, model=model,
                  classes=list(meta["classes"]), mean=float(meta["mean"]), std=float(meta["std"]),
                  val_images=ds.val_images, val_labels=ds.val_labels.long(),
                  test_images=ds.test_images, test_labels=ds.test_labels.long())
    if ctx.is_torch:
        model.eval()
        torch.manual_seed(0)  # nothing here should draw random numbers; if a section does, it is repeatable
        from mnistlab.inspect.features import features_and_logits

        with torch.inference_mode():
            ctx.val_logits = _logits(model, ctx.val_images, ctx.mean, ctx.std)
            ctx.test_features, ctx.test_logits = features_and_logits(model, ctx.test_images, ctx.mean, ctx.std)
    return ctx


# ----------------------------------------------------------------------------------------------- sections

def section_run(ctx: Context) -> Section:
    from mnistlab.models.flops import count_params, forward_flops

    cfg, res = ctx.config, ctx.results or {}
    rows: list[tuple[Any, ...]] = [("dataset", cfg.get("dataset")), ("model", cfg.get("model")),
                                   ("model arguments", json.dumps(cfg.get("model_kwargs") or {}))]
    if cfg.get("recipe"):
        rows.append(("recipe", cfg["recipe"]))
    if ctx.is_torch:
        rows.append(("parameters", f"{count_params(ctx.model):,}"))
        rows.append(("MFLOPs per image (forward)", f"{forward_flops(ctx.model) / 1e6:.2f}"))
    if res:
        rows += [("test accuracy (results.json)", pct(res.get("test_accuracy"))),
                 ("validation accuracy", pct(res.get("val_accuracy"))),
                 ("best validation accuracy (per epoch)", pct(res.get("best_val_accuracy"))),
                 ("views per test image", res.get("eval_views", 1)),
                 ("epochs / steps", f"{res.get('epochs')} / {res.get('steps')}"),
                 ("training time", f"{res.get('train_seconds', 0):.1f} s on {res.get('device', '?')}")]
    else:
        rows.append(("results.json", "missing: the run has not finished (the report shows its last checkpoint)"))
    if ctx.test_logits is not None:
        plain = (ctx.test_logits.argmax(1) == ctx.test_labels).double().mean().item()
        rows.append(("test accuracy of this report's plain views", pct(plain)))
    config_rows = [(k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in cfg.items()]
    env_rows = [(k, v) for k, v in (ctx.env or {}).items()]
    body = (table(rows, cls="facts")
            + f"<details><summary>configuration (config.json, {len(config_rows)} fields)</summary>"
            + table(config_rows, ("field", "value")) + "</details>"
            + (f"<details><summary>provenance (env.json)</summary>{table(env_rows, ('', ''))}</details>"
               if env_rows else "<p>env.json is missing.</p>"))
    return Section("run", "The run", body)


def section_curves(ctx: Context) -> Section | None:
    if not ctx.metrics:
        return None
    plt = pyplot()
    m = ctx.metrics
    epochs = [r["epoch"] for r in m]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            vals = [r.get(f"{split}_{key}") for r in m]
            if any(v is not None for v in vals):
                y = [np.nan if v is None else v for v in vals]
                ax.plot(epochs, y, style, ms=3, label="training (running, with augmentation)" if split == "train"
                        else "validation")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if "accuracy" in axes[1].get_title():
        axes[1].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
    axes[2].plot(epochs, [r.get("lr", np.nan) for r in m], "-o", ms=3, color="tab:purple")
    axes[2].set_title("learning rate at the epoch's end")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    speed = [r.get("images_per_second") for r in m if r.get("images_per_second")]
    note = f"{np.median(speed):,.0f} images/s (median over epochs)." if speed else ""
    return Section("curves", "Learning curves",
                   img(fig, "learning curves") + caption(
                       "Training figures are running means over each epoch, taken while the weights changed "
                       f"and with the run's augmentation; validation is measured at the epoch's end. {note}"))


def section_confusion(ctx: Context) -> Section | None:
    if ctx.test_logits is None:
        return None
    from mnistlab.evaluate import confusion_matrix, per_class_accuracy

    plt = pyplot()
    k = len(ctx.classes)
    pred = ctx.test_logits.argmax(1)
    conf = confusion_matrix(pred, ctx.test_labels, k)  # (K, K): row = true, column = predicted
    acc = per_class_accuracy(conf)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw=dict(width_ratios=[1.25, 1]))
    shown = conf.double() / conf.sum(1, keepdim=True).clamp(min=1)  # row-normalised: colour = share of the class
    ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if conf[i, j]:
                ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), ctx.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), ctx.classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion on the test split (counts; colour = share of the true class)")
    order = torch.argsort(acc)
    bx.barh(range(k), acc[order].numpy() * 100, color="tab:blue")
    bx.set_yticks(range(k), [ctx.classes[i] for i in order.tolist()], fontsize=8)
    lo = max(0.0, float(acc.min()) * 100 - 5)
    bx.set_xlim(lo, 100)
    for y, v in enumerate(acc[order].tolist()):
        bx.text(v * 100, y, f" {100 * v:.1f}%", va="center", fontsize=7)
    bx.set_title("per-class accuracy (recall), worst first")
    bx.grid(axis="x", alpha=0.3)
    off = conf.clone()
    off.fill_diagonal_(0)
    i, j = divmod(int(off.argmax()), k)
    text = (f"The most frequent confusion: {int(off[i, j])} test images of <b>{esc(ctx.classes[i])}</b> "
            f"predicted as <b>{esc(ctx.classes[j])}</b>.") if off.sum() else "No test image is misclassified."
    return Section("confusion", "Confusion and per-class accuracy", img(fig, "confusion matrix") + caption(text))


def _gallery(ctx: Context, idx: list[int], titles: list[str], cols: int, title: str):
    plt = pyplot()
    rows = max(1, -(-len(idx) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.45, rows * 1.65 + 0.4), squeeze=False)
    for a in axes.flat:
        a.axis("off")
    for a, i, t in zip(axes.flat, idx, titles, strict=False):
        a.imshow(ctx.test_images[i].numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        a.set_title(t, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def section_mistakes(ctx: Context) -> Section | None:
    if ctx.test_logits is None:
        return None
    probs = ctx.test_logits.softmax(1)
    p, pred = probs.max(1)
    wrong = torch.nonzero(pred != ctx.test_labels).flatten()
    body = ""
    if len(wrong):
        worst = wrong[torch.argsort(p[wrong], descending=True)][:MISTAKES].tolist()
        short = [c[:12] for c in ctx.classes]
        titles = [f"true {short[int(ctx.test_labels[i])]}\nsaid {short[int(pred[i])]} {100 * float(p[i]):.0f}%"
                  for i in worst]
        body += img(_gallery(ctx, worst, titles, 9, f"the {len(worst)} most confident mistakes "
                                                    f"(of {len(wrong)} on the test split)"), "confident mistakes")
        body += caption("Each picture: the true class, what the model said and the probability it gave "
                        "(uncalibrated softmax). Some are label noise; most show where classes overlap.")
    else:
        body += "<p>No test image is misclassified.</p>"
    # per class, the correct images the model is surest of: its idea of the class
    plt = pyplot()
    k = len(ctx.classes)
    fig, axes = plt.subplots(k, TYPICAL_PER_CLASS, figsize=(TYPICAL_PER_CLASS * 0.95 + 1.6, k * 0.95 + 0.5),
                             squeeze=False)
    for c in range(k):
        ok = torch.nonzero((pred == c) & (ctx.test_labels == c)).flatten()
        best = ok[torch.argsort(p[ok], descending=True)][:TYPICAL_PER_CLASS].tolist()
        for j in range(TYPICAL_PER_CLASS):
            a = axes[c, j]
            a.set_xticks([])
            a.set_yticks([])
            for s in a.spines.values():
                s.set_visible(False)
            if j < len(best):
                a.imshow(ctx.test_images[best[j]].numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        axes[c, 0].set_ylabel(ctx.classes[c], rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("per class, the correctly classified test images the model is surest of", fontsize=10)
    body += img(fig, "typical correct examples per class")
    return Section("mistakes", "Mistakes and typical examples", body)


def _reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (mean confidence, accuracy, count); empty bins are NaN."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    mc, acc, n = np.full(bins, np.nan), np.full(bins, np.nan), np.zeros(bins)
    for b in range(bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1])
        n[b] = int(inside.sum())
        if n[b]:
            mc[b], acc[b] = conf[inside].double().mean().item(), correct[inside].mean().item()
    return mc, acc, n


def section_calibration(ctx: Context) -> Section | None:
    if ctx.test_logits is None or ctx.val_logits is None:
        return None
    from mnistlab.deploy.predict import expected_calibration_error, fit_temperature

    bins = 15
    t = fit_temperature(ctx.val_logits, ctx.val_labels)  # fitted on validation, applied to test
    raw, scaled = ctx.test_logits.softmax(1), (ctx.test_logits / t).softmax(1)
    ece_raw = expected_calibration_error(raw, ctx.test_labels, bins)
    ece_t = expected_calibration_error(scaled, ctx.test_labels, bins)
    plt = pyplot()
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    for probs, label, style in ((raw, f"softmax: ECE {100 * ece_raw:.2f}%", "-o"),
                                (scaled, f"temperature T={t:.2f}: ECE {100 * ece_t:.2f}%", "-s")):
        mc, acc, _ = _reliability(probs, ctx.test_labels, bins)
        ax.plot(mc, acc, style, ms=4, label=label)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram, test split (15 bins)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    hx.hist(raw.max(1).values.numpy(), bins=30, range=(0, 1), alpha=0.6, label="softmax")
    hx.hist(scaled.max(1).values.numpy(), bins=30, range=(0, 1), alpha=0.6, label=f"T={t:.2f}")
    hx.set_yscale("log")
    hx.set_xlabel("confidence")
    hx.set_ylabel("test images")
    hx.set_title("how confident the model is")
    hx.legend(fontsize=8)
    text = (f"Expected calibration error (confidence-weighted gap between confidence and accuracy) on the test "
            f"split: {100 * ece_raw:.2f}% for the softmax, {100 * ece_t:.2f}% after temperature scaling "
            f"(Guo et al. 2017) with one T = {t:.3f} fitted on the validation split's NLL; T cannot change "
            "a prediction, only how sure it says it is.")
    return Section("calibration", "Calibration", img(fig, "reliability diagram") + caption(text))


def section_grad_flow(ctx: Context) -> Section | None:
    from mnistlab import gradflow
    from mnistlab.plots import grad_flow_figure

    records = gradflow.read(ctx.run_dir) if (ctx.run_dir / "grad_flow.jsonl").is_file() else []
    if not records:
        return None
    return Section("grad-flow", "Gradient flow (recorded with --grad-flow)",
                   img(grad_flow_figure(records, title=f"{ctx.config.get('model')}"), "gradient flow", dpi=80)
                   + caption("Gradient norms reaching each time step (recurrent models) and each parameter, "
                             "at the recorded steps: vanishing gradients show as a slope over time steps."))


def section_saliency(ctx: Context) -> Section | None:
    if not ctx.is_torch:
        return None
    from mnistlab.inspect.saliency import saliency_figure

    idx = ctx.sample()
    fig, st = saliency_figure(ctx.model, ctx.test_images[idx], ctx.test_labels[idx], ctx.mean, ctx.std, ctx.classes)
    corr = st["rank_correlation_vs_random"]
    rows = [(name, f"{value:.2f}") for name, value in corr.items()]
    text = (f"Maps of the predicted class's logit for a fixed sample (the first test image of each class). "
            f"Integrated gradients start from a black image in the model's normalised input space; their "
            f"completeness gap |sum of attributions - (f(x) - f(black))| / |f(x) - f(black)| is "
            f"{100 * st['completeness_gap_mean']:.2f}% on average, {100 * st['completeness_gap_max']:.2f}% at most "
            f"(trapezoid rule, intervals halved per image until the gap is under {100 * st['ig_tol']:.0f}%). "
            "Sanity check (Adebayo et al. 2018): the rank correlation between each method's maps for this model "
            "and for the same architecture with re-initialised weights. Near 1 means the map would look the same "
            "for a model that learned nothing: it shows the input, not the model. Integrated gradients from a "
            "black image multiply by the input, so their maps keep the ink's shape whatever the model; the path "
            "gradient alone is the part that depends on the model.")
    return Section("saliency", "Saliency", img(fig, "saliency maps", dpi=100) + caption(text)
                   + table(rows, ("method", "rank correlation with a randomised model")))


def section_filters(ctx: Context) -> Section | None:
    if not ctx.is_torch:
        return None
    from mnistlab.inspect.filters import feature_maps_figure, filters_figure

    filters = filters_figure(ctx.model)
    if filters is None:
        return None
    first = int(ctx.sample()[0])
    with torch.inference_mode():
        maps = feature_maps_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, index=first,
                                   labels=ctx.test_labels, classes=ctx.classes)
    return Section("filters", "Convolution filters and feature maps",
                   img(filters, "first-layer filters") + caption(
                       "The first layer's filters (3x3 weights, red positive, blue negative, each on its own scale): "
                       "most are small edge and blob detectors.")
                   + (img(maps, "feature maps") + caption(
                       "One test image at each stage: the mean over channels, then the channels that vary most over "
                       "the image. Resolution falls and the number of channels rises with depth: from where the "
                       "ink is to what is there.") if maps is not None else ""))


def section_attention(ctx: Context) -> Section | None:
    if not ctx.is_torch:
        return None
    from mnistlab.inspect.attention import attention_heads_figure, attention_rollout_figure

    idx = ctx.sample().tolist()
    with torch.inference_mode():
        heads = attention_heads_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, labels=ctx.test_labels,
                                       classes=ctx.classes, indices=idx[:3])
        if heads is None:
            return None
        rollout = attention_rollout_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, labels=ctx.test_labels,
                                           classes=ctx.classes, indices=idx)
    return Section("attention", "Attention",
                   img(heads, "attention per head and layer") + caption(
                       "How much attention each patch receives in each head of each block, averaged over all "
                       "querying patches, for three test images.")
                   + img(rollout, "attention rollout") + caption(
                       "Attention rollout (Abnar and Zuidema 2020): each layer's head-averaged attention plus the "
                       "identity (the residual connection), rows renormalised, multiplied up the layers: how much "
                       "each patch's input reaches the pooled output."))


def section_hidden(ctx: Context) -> Section | None:
    if not ctx.is_torch:
        return None
    from mnistlab.inspect.hidden import hidden_states_figure

    with torch.inference_mode():
        fig = hidden_states_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, labels=ctx.test_labels,
                                   classes=ctx.classes, indices=ctx.sample().tolist()[:3])
    if fig is None:
        return None
    return Section("hidden", "Hidden state over time", img(fig, "hidden states") + caption(
        "For three test images: the hidden state h_t (units x time steps) as the model reads the image, and the "
        "classifier applied to h_t at each step: what it would answer if the image ended there. The head was "
        "trained on the last step only, so early probabilities are indicative, not calibrated."))


def section_features(ctx: Context) -> Section | None:
    if ctx.test_features is None:
        return None
    from mnistlab.inspect.features import class_cosine_figure, feature_map_figure

    labels = ctx.test_labels.numpy()
    proj = feature_map_figure(ctx.test_features, labels, ctx.classes)
    cos_fig, cos = class_cosine_figure(ctx.test_features, labels, ctx.classes)
    off = cos.copy()
    np.fill_diagonal(off, -np.inf)
    i, j = np.unravel_index(np.nanargmax(off), off.shape)
    return Section("features", "What the last layer sees", img(proj, "PCA and t-SNE of the features") + caption(
        f"The penultimate features ({ctx.test_features.shape[1]} numbers per image, the classifier's input) of the "
        "test set in two dimensions, coloured by true class: PCA of all of them, t-SNE of a seeded subsample.")
        + img(cos_fig, "cosine similarity of class means") + caption(
        f"Cosine similarity between the class-mean feature vectors, centred on the global mean. The closest pair: "
        f"<b>{esc(ctx.classes[i])}</b> and <b>{esc(ctx.classes[j])}</b> ({cos[i, j]:.2f})."))


SECTIONS: list[Callable[[Context], Section | None]] = [
    section_run, section_curves, section_confusion, section_mistakes, section_calibration, section_saliency,
    section_filters, section_attention, section_hidden, section_grad_flow, section_features,
]


# ----------------------------------------------------------------------------------------------- the page

STYLE = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #e3e6ec; --accent: #2f6fde; --bg: #f7f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: var(--bg); }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); }
nav { padding: 8px 28px; background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 14px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 28px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 20px 18px;
          margin: 18px 0; }
section h2 { margin: 0 0 10px; font-size: 18px; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13.5px; }
td, th { border-bottom: 1px solid var(--line); padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }
table.facts td:first-child { color: var(--muted); }
.caption { color: var(--muted); font-size: 13.5px; margin: 4px 0 0; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--accent); }
footer { color: var(--muted); font-size: 12.5px; text-align: center; padding-bottom: 24px; }
"""


def render(ctx: Context, sections: list[Section], skipped: list[str]) -> str:
    cfg, res = ctx.config, ctx.results or {}
    title = f"{cfg.get('model')} on {cfg.get('dataset')}"
    acc = f"test accuracy {pct(res.get('test_accuracy'))}" if res else "unfinished run"
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in ctx.timings.items())
    skipped_text = f" Not applicable to this run: {esc(', '.join(skipped))}." if skipped else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>mnistlab report: {esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(ctx.run_dir.name)} · {esc(acc)} · step {ctx.meta.get('step')}"
            f"</p></header><nav>{nav}</nav><main>{body}</main>"
            f"<footer>Built by mnistlab report from {esc(ctx.run_dir.name)}. Time per part: {esc(timings)}."
            f"{skipped_text}</footer></body></html>")


def build_report(run_dir: Path, progress: Callable[[str], None] | None = None) -> tuple[str, Context]:
    """The report's HTML and the context it was built from (timings per section included)."""
    t0 = time.perf_counter()
    ctx = load_context(run_dir)
    ctx.timings["loading and evaluating"] = time.perf_counter() - t0
    sections, skipped = [], []
    for make in SECTIONS:
        name = make.__name__.removeprefix("section_")
        if progress:
            progress(name)
        t = time.perf_counter()
        if not ctx.is_torch and make is not section_run and make is not section_curves:
            skipped.append(name)
            continue
        s = make(ctx)
        ctx.timings[name] = time.perf_counter() - t
        if s is None:
            skipped.append(name)
        else:
            sections.append(s)
    return render(ctx, sections, skipped), ctx


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Build RUN_DIR's report and write it atomically (default RUN_DIR/report.html)."""
    from mnistlab.files import atomic_write_text
    from mnistlab.run import note

    out = Path(out) if out else Path(run_dir) / REPORT
    t = time.perf_counter()
    page, _ = build_report(Path(run_dir), progress=lambda name: note(f"report: {name}"))
    atomic_write_text(out, page)
    note(f"report built in {time.perf_counter() - t:.1f} s")
    return out
