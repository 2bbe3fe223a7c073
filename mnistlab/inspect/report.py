"""`mnistlab report RUN_DIR`: one self-contained HTML page of what a run learned.

Built from the run folder alone (config.json, env.json, metrics.jsonl, results.json, the checkpoint)
and the dataset its config names. Every image is an inline PNG and the style sheet is inline, with no
script and no link outside the file, so the page opens from disk on a machine without a network.

Three steps. The context (`load_context`): the run's files and model, evaluated once on the validation
and test splits on plain views (no test-time augmentation, whatever the run used for results.json: the
report says so where the two differ). The sections (`sections_for`): which apply to this model is
decided before any is drawn (attention for the ViT, hidden states for rnn/gru/lstm, filters for conv
models, gradient flow when the run recorded it); each is one function `(Context) -> Section | None`
made of figures, captions and tables. The page (`render`): templates/report.html.j2, through Jinja2
with autoescape on, so whatever a run folder holds (a class name, a config value) is shown as text.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from markupsafe import Markup

from mnistlab.plots import figure_png

REPORT = "report.html"
SAMPLE_SIZE = 8  # images for saliency, attention and hidden states: the first test image of each class, in order
MISTAKES = 36
TYPICAL_PER_CLASS = 8
CALIBRATION_BINS = 15


# ----------------------------------------------------------------------------------------------- a section's parts

@dataclass
class Image:
    """A figure as an inline PNG (a data: URI)."""

    src: str
    alt: str
    kind: str = "image"


@dataclass
class Text:
    """A caption under a figure, or a paragraph. Plain text is escaped; Markup (built with Markup.format,
    which escapes its arguments) keeps its tags."""

    text: str
    kind: str = "caption"


@dataclass
class Table:
    rows: list[tuple[Any, ...]]
    header: tuple[str, ...] | None = None
    cls: str = ""
    summary: str | None = None  # folded under <details> with this summary
    kind: str = "table"


@dataclass
class Section:
    id: str  # the HTML anchor; tests look sections up by it
    title: str
    parts: list[Image | Text | Table]


def image(fig, alt: str, dpi: int = 90) -> Image:
    """A matplotlib figure as an inline PNG (the figure is closed)."""
    return Image("data:image/png;base64," + base64.b64encode(figure_png(fig, dpi=dpi)).decode("ascii"), alt)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# ----------------------------------------------------------------------------------------------- the context

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
    from mnistlab.record import RunRecord
    from mnistlab.run import ENV, RESULTS

    record = RunRecord(run_dir)
    run_dir = record.path
    model, meta = record.load_model()
    cfg = TrainConfig.from_dict(meta["config"], source=f"{run_dir}: the checkpoint's config")
    metrics = record.metrics()
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, offline=cfg.offline, val_size=cfg.val_size)
    ctx = Context(run_dir=run_dir, config=meta["config"], env=record.env() if record.has(ENV) else None,
                  results=record.results() if record.has(RESULTS) else None, metrics=metrics, meta=meta, model=model,
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

SCRATCH_NOTE = ("Trained by the scratch engine (numpy): this page shows its configuration and learning curves; "
                "the figures that evaluate or look inside a PyTorch model do not apply.")


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
    parts: list[Image | Text | Table] = [] if ctx.is_torch else [Text(SCRATCH_NOTE, "paragraph")]
    parts += [Table(rows, cls="facts"),
              Table(config_rows, ("field", "value"), summary=f"configuration (config.json, {len(config_rows)} fields)")]
    if ctx.env:
        parts.append(Table(list(ctx.env.items()), ("", ""), summary="provenance (env.json)"))
    else:
        parts.append(Text("env.json is missing.", "paragraph"))
    return Section("run", "The run", parts)


def section_curves(ctx: Context) -> Section | None:
    from mnistlab.plots import learning_curves_figure

    if not ctx.metrics:
        return None
    speed = [r.get("images_per_second") for r in ctx.metrics if r.get("images_per_second")]
    note = f"{np.median(speed):,.0f} images/s (median over epochs)." if speed else ""
    return Section("curves", "Learning curves", [
        image(learning_curves_figure(ctx.metrics), "learning curves"),
        Text("Training figures are running means over each epoch, taken while the weights changed and with the "
             f"run's augmentation; validation is measured at the epoch's end. {note}")])


def section_confusion(ctx: Context) -> Section:
    from mnistlab.evaluate import confusion_matrix
    from mnistlab.inspect.predictions import confusion_figure, most_confused

    conf = confusion_matrix(ctx.test_logits.argmax(1), ctx.test_labels, len(ctx.classes))  # (K, K)
    worst = most_confused(conf)
    text = "No test image is misclassified." if worst is None else Markup(
        "The most frequent confusion: {} test images of <b>{}</b> predicted as <b>{}</b>.").format(
        worst[2], ctx.classes[worst[0]], ctx.classes[worst[1]])
    return Section("confusion", "Confusion and per-class accuracy",
                   [image(confusion_figure(conf, ctx.classes), "confusion matrix"), Text(text)])


def section_mistakes(ctx: Context) -> Section:
    from mnistlab.inspect.predictions import mistakes_figure, typical_figure

    probs = ctx.test_logits.softmax(1)
    mistakes = mistakes_figure(ctx.test_images, ctx.test_labels, probs, ctx.classes, MISTAKES)
    if mistakes is None:
        parts: list[Image | Text | Table] = [Text("No test image is misclassified.", "paragraph")]
    else:
        parts = [image(mistakes, "confident mistakes"),
                 Text("Each picture: the true class, what the model said and the probability it gave (uncalibrated "
                      "softmax). Some are label noise; most show where classes overlap.")]
    parts.append(image(typical_figure(ctx.test_images, ctx.test_labels, probs, ctx.classes, TYPICAL_PER_CLASS),
                       "typical correct examples per class"))
    return Section("mistakes", "Mistakes and typical examples", parts)


def section_calibration(ctx: Context) -> Section:
    from mnistlab.calibration import expected_calibration_error, fit_temperature_with_reason
    from mnistlab.inspect.predictions import calibration_figure

    t, why = fit_temperature_with_reason(ctx.val_logits, ctx.val_labels)  # fitted on validation, applied to test
    raw, scaled = ctx.test_logits.softmax(1), (ctx.test_logits / t).softmax(1)
    ece_raw = expected_calibration_error(raw, ctx.test_labels, CALIBRATION_BINS)
    ece_t = expected_calibration_error(scaled, ctx.test_labels, CALIBRATION_BINS)
    fig = calibration_figure(raw, scaled, ctx.test_labels, t, ece_raw, ece_t, CALIBRATION_BINS)
    return Section("calibration", "Calibration", [image(fig, "reliability diagram"), Text(
        f"Expected calibration error (confidence-weighted gap between confidence and accuracy) on the test split: "
        f"{100 * ece_raw:.2f}% for the softmax, {100 * ece_t:.2f}% after temperature scaling (Guo et al. 2017), "
        f"T = {t:.3f}. The temperature minimising the validation split's NLL: {why}. T cannot change a prediction, "
        "only how sure it says it is.")])


def section_grad_flow(ctx: Context) -> Section | None:
    from mnistlab import gradflow
    from mnistlab.plots import grad_flow_figure

    records = gradflow.read(ctx.run_dir)
    if not records:
        return None
    return Section("grad-flow", "Gradient flow (recorded with --grad-flow)", [
        image(grad_flow_figure(records, title=f"{ctx.config.get('model')}"), "gradient flow", dpi=80),
        Text("Gradient norms reaching each time step (recurrent models) and each parameter, at the recorded "
             "steps: vanishing gradients show as a slope over time steps.")])


def section_saliency(ctx: Context) -> Section:
    from mnistlab.inspect.saliency import saliency_figure

    idx = ctx.sample()
    fig, st = saliency_figure(ctx.model, ctx.test_images[idx], ctx.test_labels[idx], ctx.mean, ctx.std, ctx.classes)
    rows = [(name, f"{value:.2f}") for name, value in st["rank_correlation_vs_random"].items()]
    return Section("saliency", "Saliency", [image(fig, "saliency maps", dpi=100), Text(
        f"Maps of the predicted class's logit for a fixed sample (the first test image of each class). "
        f"Integrated gradients start from a black image in the model's normalised input space; their "
        f"completeness gap |sum of attributions - (f(x) - f(black))| / |f(x) - f(black)| is "
        f"{100 * st['completeness_gap_mean']:.2f}% on average, {100 * st['completeness_gap_max']:.2f}% at most "
        f"(trapezoid rule, intervals halved per image until the gap is under {100 * st['ig_tol']:.0f}%). "
        "Sanity check (Adebayo et al. 2018): the rank correlation between each method's maps for this model "
        "and for the same architecture with re-initialised weights. Near 1 means the map would look the same "
        "for a model that learned nothing: it shows the input, not the model. Integrated gradients from a "
        "black image multiply by the input, so their maps keep the ink's shape whatever the model; the path "
        "gradient alone is the part that depends on the model."),
        Table(rows, ("method", "rank correlation with a randomised model"))])


def section_filters(ctx: Context) -> Section | None:
    from mnistlab.inspect.filters import feature_maps_figure, filters_figure

    filters = filters_figure(ctx.model)
    if filters is None:
        return None
    with torch.inference_mode():
        maps = feature_maps_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, index=int(ctx.sample()[0]),
                                   labels=ctx.test_labels, classes=ctx.classes)
    what = ("not learned but fixed before training (whiten=true) to the principal directions of the training "
            "images' 3x3 patches, each beside its negative: from a smooth blob to fine checkerboards"
            if getattr(ctx.model, "whiten", False) else "most are small edge and blob detectors")
    parts: list[Image | Text | Table] = [image(filters, "first-layer filters"), Text(
        f"The first layer's filters (3x3 weights, red positive, blue negative, each on its own scale): {what}.")]
    if maps is not None:
        parts += [image(maps, "feature maps"), Text(
            "One test image at each stage: the mean over channels, then the channels that vary most over the "
            "image. Resolution falls and the number of channels rises with depth: from where the ink is to what "
            "is there.")]
    return Section("filters", "Convolution filters and feature maps", parts)


def section_attention(ctx: Context) -> Section | None:
    from mnistlab.inspect.attention import attention_heads_figure, attention_rollout_figure

    idx = ctx.sample().tolist()
    with torch.inference_mode():
        heads = attention_heads_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, labels=ctx.test_labels,
                                       classes=ctx.classes, indices=idx[:3])
        if heads is None:
            return None
        rollout = attention_rollout_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, labels=ctx.test_labels,
                                           classes=ctx.classes, indices=idx)
    return Section("attention", "Attention", [
        image(heads, "attention per head and layer"),
        Text("How much attention each patch receives in each head of each block, averaged over all querying "
             "patches, for three test images."),
        image(rollout, "attention rollout"),
        Text("Attention rollout (Abnar and Zuidema 2020): each layer's head-averaged attention plus the identity "
             "(the residual connection), rows renormalised, multiplied up the layers: how much each patch's input "
             "reaches the pooled output.")])


def section_hidden(ctx: Context) -> Section | None:
    from mnistlab.inspect.hidden import hidden_states_figure

    with torch.inference_mode():
        fig = hidden_states_figure(ctx.model, ctx.test_images, ctx.mean, ctx.std, labels=ctx.test_labels,
                                   classes=ctx.classes, indices=ctx.sample().tolist()[:3])
    if fig is None:
        return None
    return Section("hidden", "Hidden state over time", [image(fig, "hidden states"), Text(
        "For three test images: the hidden state h_t (units x time steps) as the model reads the image, and the "
        "classifier applied to h_t at each step: what it would answer if the image ended there. The head was "
        "trained on the last step only, so early probabilities are indicative, not calibrated.")])


def section_features(ctx: Context) -> Section:
    from mnistlab.inspect.features import class_cosine_figure, feature_map_figure

    labels = ctx.test_labels.numpy()
    proj = feature_map_figure(ctx.test_features, labels, ctx.classes)
    cos_fig, cos = class_cosine_figure(ctx.test_features, labels, ctx.classes)
    off = cos.copy()
    np.fill_diagonal(off, -np.inf)
    i, j = np.unravel_index(np.nanargmax(off), off.shape)
    return Section("features", "What the last layer sees", [
        image(proj, "PCA and t-SNE of the features"),
        Text(f"The penultimate features ({ctx.test_features.shape[1]} numbers per image, the classifier's input) "
             "of the test set in two dimensions, coloured by true class: PCA of all of them, t-SNE of a seeded "
             "subsample."),
        image(cos_fig, "cosine similarity of class means"),
        Text(Markup("Cosine similarity between the class-mean feature vectors, centred on the global mean. The "
                    "closest pair: <b>{}</b> and <b>{}</b> ({:.2f}).").format(ctx.classes[i], ctx.classes[j],
                                                                            float(cos[i, j])))])


SectionFn = Callable[[Context], Section | None]


def sections_for(ctx: Context) -> list[SectionFn]:
    """The sections that apply to this run, in page order, chosen from the model and the run's files."""
    if not ctx.is_torch:  # the scratch engine: no predictions here, no PyTorch modules to look into
        return [section_run, section_curves]
    from mnistlab.gradflow import GRAD_FLOW_FILE
    from mnistlab.inspect.attention import has_attention
    from mnistlab.inspect.filters import conv_stages
    from mnistlab.inspect.hidden import is_recurrent

    model = ctx.model
    by_model = [(section_filters, bool(conv_stages(model))), (section_attention, has_attention(model)),
                (section_hidden, is_recurrent(model)), (section_grad_flow, (ctx.run_dir / GRAD_FLOW_FILE).is_file())]
    return [section_run, section_curves, section_confusion, section_mistakes, section_calibration, section_saliency,
            *(make for make, applies in by_model if applies), section_features]


# ----------------------------------------------------------------------------------------------- the page

def render(ctx: Context, sections: list[Section]) -> str:
    """The page: templates/report.html.j2 filled in, every value escaped unless it is Markup."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("mnistlab.inspect", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    res = ctx.results or {}
    return env.get_template("report.html.j2").render(
        title=f"{ctx.config.get('model')} on {ctx.config.get('dataset')}", run_name=ctx.run_dir.name,
        accuracy=f"test accuracy {pct(res.get('test_accuracy'))}" if res else "unfinished run",
        step=ctx.meta.get("step"), sections=sections,
        timings=", ".join(f"{k} {v:.1f} s" for k, v in ctx.timings.items()))


def build_report(run_dir: Path, progress: Callable[[str], None] | None = None) -> tuple[str, Context]:
    """The report's HTML and the context it was built from (timings per section included)."""
    t0 = time.perf_counter()
    ctx = load_context(run_dir)
    ctx.timings["loading and evaluating"] = time.perf_counter() - t0
    sections = []
    for make in sections_for(ctx):
        name = make.__name__.removeprefix("section_")
        if progress:
            progress(name)
        t = time.perf_counter()
        section = make(ctx)
        ctx.timings[name] = time.perf_counter() - t
        if section is not None:
            sections.append(section)
    return render(ctx, sections), ctx


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
