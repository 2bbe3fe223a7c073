"""The model folder (`mnistlab export --format hf`): it gives the run's logits bit for bit for every model,
its card's YAML parses and quotes results.json's accuracy, and every bad folder is one UserError that
writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mnistlab.calibration import CALIBRATION, FORMAT
from mnistlab.checkpoint import CHECKPOINT, save_checkpoint
from mnistlab.config import resolve_config
from mnistlab.deploy.model_folder import (
    CARD,
    CONFIG,
    SAMPLES,
    THRESHOLD_MEASUREMENT,
    WEIGHTS,
    export_model_folder,
    read_model_folder,
)
from mnistlab.errors import UserError
from mnistlab.models import create_model, list_models
from mnistlab.record import load_run_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def front_matter(card: str) -> dict:
    """The YAML between the card's two leading '---' lines, parsed as the Hub parses it."""
    yaml = pytest.importorskip("yaml")
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "the card does not start with YAML front matter"
    return yaml.safe_load(match.group(1))


def fake_run(folder: Path, name: str, *, threshold: float | None = 0.62, accuracy: float = 0.8125,
             **model_kwargs) -> Path:
    """A run folder as training leaves it, without training: an initialised model's checkpoint, config.json,
    results.json, env.json and calibration.json. Its data_dir does not exist, so no samples picture."""
    torch.manual_seed(0)
    model = create_model(name, **model_kwargs)
    cfg = vars(resolve_config(dict(model=name, model_kwargs=model_kwargs, dataset="digits", seed=3)))
    cfg.update(data_dir=str(folder / "no-data-here"))
    meta = dict(model=name, model_kwargs=model_kwargs, in_chans=1, num_classes=10, classes=[str(i) for i in range(10)],
                mean=0.1557, std=0.2771, config=cfg, step=21, hflip_tta=False, shift_tta=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / CHECKPOINT, model, meta)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "results.json").write_text(json.dumps(dict(test_accuracy=accuracy, test_loss=0.5, val_accuracy=0.8,
                                                         params=7, device="cpu", precision="fp32", eval_views=1)))
    (folder / "env.json").write_text(json.dumps(dict(git_commit="0123abc", torch=torch.__version__)))
    (folder / CALIBRATION).write_text(json.dumps(dict(
        format=FORMAT, step=21, temperature=0.75, threshold=threshold, temperature_reason="fitted on 9 images",
        threshold_reason="accepts 95% of 8" if threshold else "unavailable: too few correct answers")))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One exported mlp folder, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("exported")
    folder, _ = export_model_folder(fake_run(tmp / "run", "mlp", hidden=[16]), tmp / "mlp-folder")
    return folder


@pytest.mark.parametrize("name", list_models())
def test_the_folder_gives_the_runs_logits_bit_for_bit(tmp_path, name, one_thread):
    run = fake_run(tmp_path / "run", name)
    folder, samples_note = export_model_folder(run, tmp_path / "folder")
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, CONFIG, CARD])
    assert "not on this machine" in samples_note and "\n" not in samples_note
    model, meta = read_model_folder(folder)
    want_model, want_meta = load_run_checkpoint(run)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), want_model(x))
    for key in ("model", "model_kwargs", "in_chans", "num_classes", "classes", "mean", "std", "config", "step"):
        assert meta[key] == want_meta[key], key
    assert meta["calibration"]["temperature"] == 0.75 and meta["calibration"]["threshold"] == 0.62
    assert not model.training


def test_config_json_names_what_a_consumer_needs(exported):
    config = json.loads((exported / CONFIG).read_text())
    from mnistlab import __version__

    assert config["library_name"] == "mnistlab" and config["mnistlab_format"] == 1
    assert config["mnistlab_version"] == __version__
    assert (config["architecture"], config["model_args"]) == ("mlp", {"hidden": [16]})
    assert config["classes"] == [str(i) for i in range(10)] and config["id2label"]["3"] == "3"
    assert (config["mean"], config["std"]) == (0.1557, 0.2771)
    assert config["preprocessing"]["convention"] == "digits" and config["preprocessing"]["input_size"] == [28, 28]
    assert (config["calibration"]["temperature"], config["calibration"]["threshold"]) == (0.75, 0.62)


def test_the_cards_yaml_parses_and_its_accuracy_is_results_json(exported):
    card = (exported / CARD).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mnistlab" and meta["license"] == "mit"
    assert "mnistlab" in meta["tags"] and meta["datasets"] == ["digits"] and meta["metrics"] == ["accuracy"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    (metric,) = result["metrics"]
    accuracy = json.loads((exported.parent / "run" / "results.json").read_text())["test_accuracy"]
    assert metric == {"type": "accuracy", "value": accuracy, "name": "Test accuracy"}
    assert "81.25%" in card  # the measured results below the front matter
    assert "--seed 3" in card and "0123abc" in card  # how it was trained: command, seed, commit
    assert "59" not in card.split("unsure")[0][-40:]  # no invented threshold: it is the run's 62%
    assert 'below 62.00% is answered "unsure"' in card and THRESHOLD_MEASUREMENT["digits"] in card
    assert "not on this machine" in card  # the missing picture said in one line


def test_a_card_says_plainly_when_there_is_no_threshold(tmp_path):
    folder, _ = export_model_folder(fake_run(tmp_path / "run", "linear", threshold=None), tmp_path / "out")
    card = (folder / CARD).read_text()
    assert "No reject threshold is available" in card and "unavailable: too few correct answers" in card
    assert json.loads((folder / CONFIG).read_text())["calibration"]["threshold"] is None


def test_the_measurement_the_card_quotes_is_docs_deploy_mds():
    table = (ROOT / "docs" / "deploy.md").read_text()
    rows = {"digits": "| digits cnn |", "fashion-mnist": "| fashion `--recipe fast` |"}
    for dataset, text in THRESHOLD_MEASUREMENT.items():
        (row,) = [line for line in table.splitlines() if line.startswith(rows[dataset])]
        own, other, scribbles = re.search(r"(\d+)% / (\d+)% / (\d+)%", row).groups()
        assert re.search(rf"{own}% .* {other}% .* {scribbles}% of scribbles", text), (dataset, row)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda f: flip_byte(f / WEIGHTS, 5), "does not match the checksum recorded when it was exported"),
    (lambda f: flip_header_byte(f / WEIGHTS), "not a readable safetensors file"),
    (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:100]), "not a readable safetensors file"),
    (lambda f: (f / WEIGHTS).unlink(), "no model.safetensors beside its config.json"),
    (lambda f: rewrite_config(f, architecture="resnet"), "config.json: .*resnet"),
    (lambda f: rewrite_config(f, model_args={"hidden": [32]}), "tensors do not fit the mlp that config.json describes"),
    (lambda f: rewrite_config(f, num_classes=3, classes=["a", "b", "c"]), "tensors do not fit"),
    (lambda f: rewrite_config(f, model_args={"depth": 2}), "config.json: .*depth"),
    (lambda f: rewrite_config(f, std=0), "std > 0"),
    (lambda f: rewrite_config(f, mnistlab_format=9), "mnistlab_format 9"),
    (lambda f: (f / CONFIG).write_text("{not json"), "not readable JSON"),
    (lambda f: (f / CONFIG).write_text("[]"), "not an mnistlab model's config"),
], ids=["flipped-tensor-byte", "flipped-header-byte", "truncated", "no-weights", "unknown-architecture",
        "shape-mismatch", "class-count-mismatch", "unknown-model-arg", "zero-std", "future-format", "config-not-json",
        "config-not-object"])
def test_a_damaged_folder_is_one_user_error_and_nothing_is_written(exported, tmp_path, damage, message):
    folder = copy_of(exported, tmp_path)
    damage(folder)
    before = snapshot(folder)
    with pytest.raises(UserError, match=message) as e:
        read_model_folder(folder)
    assert "\n" not in str(e.value)
    assert snapshot(folder) == before


def test_a_missing_path_an_empty_folder_a_file_and_a_run_folder_are_user_errors(tmp_path, exported):
    with pytest.raises(UserError, match="no such folder"):
        read_model_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an mnistlab model folder, no config.json"):
        read_model_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="not a folder"):
        read_model_folder(exported / WEIGHTS)
    with pytest.raises(UserError, match="a training run, not a model folder"):
        read_model_folder(exported.parent / "run")
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "nowhere").exists()


def test_an_export_over_a_folder_that_is_not_a_model_folder_is_refused(tmp_path, exported):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an mnistlab model folder; choose another -o"):
        export_model_folder(exported.parent / "run", other)
    assert snapshot(other) == {"notes.txt": b"keep me"}


def test_a_failing_export_leaves_the_previous_folder_and_no_temporary_one(tmp_path, monkeypatch):
    import mnistlab.deploy.model_folder as model_folder

    run = fake_run(tmp_path / "run", "linear")
    out, _ = export_model_folder(run, tmp_path / "out")
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_folder, "render_card", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model_folder(run, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_huggingface_hubs_from_pretrained_loads_the_folder_strictly_offline(exported, monkeypatch):
    pytest.importorskip("huggingface_hub", reason='needs the hub extra: pip install "mnistlab[hub]"')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mnistlab.deploy.hub import MnistlabModel

    hub_model = MnistlabModel.from_pretrained(exported)
    model, _ = read_model_folder(exported)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hub_model(x), model(x))
    assert hub_model.meta["classes"] == [str(i) for i in range(10)] and not hub_model.training
    with pytest.raises(UserError, match="loads strictly"):
        MnistlabModel.from_pretrained(exported, strict=False)
    with pytest.raises(UserError, match="mnistlab export RUN_DIR --format hf"):
        hub_model.save_pretrained(exported)


def test_from_pretrained_refuses_a_damaged_folder_like_read_model_folder(exported, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason='needs the hub extra: pip install "mnistlab[hub]"')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mnistlab.deploy.hub import MnistlabModel

    folder = copy_of(exported, tmp_path)
    flip_byte(folder / WEIGHTS, 5)
    with pytest.raises(UserError, match="checksum"):
        MnistlabModel.from_pretrained(folder)


@pytest.mark.slow
def test_a_trained_digits_run_exports_with_its_samples_and_its_measured_accuracy(tmp_path):
    from mnistlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "linear", "--epochs", "1", "--threads", "1",
                 "--run-dir", str(run)]) == 0
    assert main(["export", str(run), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    folder = tmp_path / "hf"
    assert (folder / SAMPLES).stat().st_size > 5000
    card = (folder / CARD).read_text()
    accuracy = json.loads((run / "results.json").read_text())["test_accuracy"]
    assert front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == accuracy
    assert f"![the first test images and the model's answers]({SAMPLES})" in card
    from mnistlab.calibration import model_logits
    from mnistlab.data.dataset import load_dataset

    ds = load_dataset("digits", offline=True)
    model, meta = read_model_folder(folder)
    want_model, _ = load_run_checkpoint(run)
    got = model_logits(model, ds.test_images, meta["mean"], meta["std"])
    assert torch.equal(got, model_logits(want_model, ds.test_images, meta["mean"], meta["std"]))
    assert (got.argmax(1) == ds.test_labels).sum().item() / len(ds.test_labels) == pytest.approx(accuracy, abs=1e-12)


@pytest.mark.parametrize("flags", [
    dict(dataset="digits", model="cnn", epochs=3),
    dict(dataset="fashion-mnist", recipe="fast", seed=4, lr=0.05),
    dict(dataset="kmnist", model="mlp", model_kwargs={"hidden": [64, 32]}, augment="shift", deterministic=True,
         label_smoothing=0.0),
])
def test_the_cards_train_command_resolves_to_the_runs_config(flags):
    import shlex
    from dataclasses import fields

    from mnistlab.cli import build_parser
    from mnistlab.config import TrainConfig
    from mnistlab.deploy.model_folder import _train_command

    recorded = vars(resolve_config({k: v for k, v in flags.items() if v is not None}))
    args = build_parser().parse_args(shlex.split(_train_command(recorded))[1:])
    explicit = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if f.metadata["flag"]}
    explicit["model_kwargs"] = dict(args.model_arg or [])
    rebuilt = vars(resolve_config(explicit))
    assert {k: v for k, v in rebuilt.items() if k != "run_dir"} == {k: v for k, v in recorded.items() if k != "run_dir"}


def test_an_export_never_downloads_a_missing_dataset_it_skips_the_picture(tmp_path, monkeypatch):
    import urllib.request

    import mnistlab.data.download as download

    def no_network(*args, **kwargs):
        raise AssertionError("an export tried to download")

    monkeypatch.setattr(download, "download_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    import mnistlab.data.resolve as resolve

    real_dirs = resolve.candidate_dirs  # only the test's empty cache: MNIST may sit in a system folder elsewhere
    monkeypatch.setattr(resolve, "candidate_dirs", lambda spec: [d for d in real_dirs(spec) if d[0] == "cache"])
    run = fake_run(tmp_path / "run", "linear")
    config = json.loads((run / "config.json").read_text())
    model, meta = load_run_checkpoint(run)
    meta["config"].update(dataset="mnist", data_dir=None)  # MNIST: not in this test's empty cache
    from mnistlab.deploy.model_folder import draw_samples

    note = draw_samples(tmp_path / SAMPLES, model, meta, 1.0, None)
    assert note.startswith("no samples.png: the run's test images are not on this machine") and "\n" not in note
    assert not (tmp_path / SAMPLES).exists() and config["dataset"] == "digits"


@pytest.mark.slow
def test_a_scratch_engine_run_is_refused_and_nothing_is_written(tmp_path, idx_dir):
    from mnistlab.scratch import train as scratch_train

    cfg = resolve_config(dict(engine="scratch", model="mlp", data_dir=str(idx_dir), dataset=None, epochs=1,
                              batch_size=50, val_size=20, run_dir=str(tmp_path / "run")))
    cfg.dataset = None
    scratch_train.train(cfg)
    with pytest.raises(UserError, match="scratch-engine"):
        export_model_folder(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny"]


def test_a_run_without_calibration_exports_and_its_card_says_so(tmp_path):
    run = fake_run(tmp_path / "run", "linear")
    (run / CALIBRATION).unlink()
    folder, _ = export_model_folder(run, tmp_path / "out")
    card = (folder / CARD).read_text()
    assert "Probabilities are the plain softmax: no calibration.json" in card
    assert "No reject threshold is available" in card
    config = json.loads((folder / CONFIG).read_text())
    assert config["calibration"] is None and config["calibration_note"].startswith("no calibration.json")
    assert read_model_folder(folder)[1]["calibration"] is None
