# %% [markdown]
# # Chapter 11: From a model to the world
#
# A trained model is only useful once something outside the training script can ask it a question.
# This chapter takes one small model through every door mnistlab has, all from Python:
#
# 1. train it (`mnistlab.train(...)`) and load it back (`mnistlab.load(run)`);
# 2. ask it about a digit drawn with PIL and one made as a numpy array, with a calibrated
#    probability, and watch it say **unsure** about a scribble;
# 3. export it to **ONNX** and check that onnxruntime computes the same logits as PyTorch;
#    then an **int8** version, four times smaller, and how much it disagrees;
# 4. **serve** it: start `mnistlab serve` as its own process, send it a picture over HTTP, and get
#    the same answer as in Python;
# 5. train the same run on **two processes** with `torchrun`, and get the same accuracy.

# %%
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw

import mnistlab
from mnistlab.data import load_dataset
from mnistlab.data.batches import to_input

torch.manual_seed(0)
torch.set_num_threads(1)  # a small MLP: a second thread only waits for the first
work = Path(tempfile.mkdtemp())  # run folders go here, never into the repository

# %% [markdown]
# ## Train, then load
#
# `mnistlab.train` takes `mnistlab train`'s flags as keywords, checks them the same way, and returns
# the finished run. An MLP on the bundled digits trains in a few seconds. At the end, training
# fits the **calibration** on the validation split (a temperature that makes the probabilities
# honest, and a threshold below which an answer is called unsure) and stores it in the run folder.

# %%
flags = dict(dataset="digits", model="mlp", epochs=10, seed=0, threads=1)
run = mnistlab.train(**flags, run_dir=str(work / "mlp"), quiet=True)
print(f"test accuracy {run.results['test_accuracy']:.2%} after {run.results['epochs']} epochs")
assert run.results["test_accuracy"] > 0.9, run.results["test_accuracy"]

clf = mnistlab.load(run.path)  # the model, its preprocessing and its calibration
print(f"{clf.meta['model']} on {clf.dataset}, classes {clf.classes}, step {clf.meta['step']}")
assert clf.threshold is not None, "calibration found enough validation evidence for a threshold"
print(f"temperature {clf.temperature:.3f}, unsure below a top probability of {clf.threshold:.3f}")

# %% [markdown]
# ## Ask it about your own pictures
#
# `clf.predict` takes a file path, a PIL image or a numpy array, of any size, dark ink on light
# paper or the reverse: it finds the ink, crops and centres it the way the dataset's digits are,
# and answers. Below: a 7 drawn with two PIL lines, a 1 made as a numpy array (a dark bar on white),
# and a scribble of random lines that is no digit at all.

# %%
seven = Image.new("L", (200, 200), "white")  # a sheet of paper, 200x200 pixels
pen = ImageDraw.Draw(seven)
pen.line([(40, 40), (160, 40), (90, 170)], fill="black", width=16)  # the bar, then the stem

one = np.full((120, 120), 255, dtype=np.uint8)  # (H, W) uint8: white
one[15:105, 52:68] = 0  # a dark vertical bar

rng = np.random.default_rng(0)
scribbles = []  # 20 pictures of 8 random strokes each: no digit at all
for _ in range(20):
    scribbles.append(Image.new("L", (200, 200), "white"))
    ImageDraw.Draw(scribbles[-1]).line([tuple(p) for p in rng.integers(20, 180, (8, 2))], fill="black", width=10)
scribble = scribbles[0]

answers = clf.predict([seven, one, scribble], top=3)
for name, a in zip(["PIL seven", "numpy one", "scribble"], answers, strict=True):
    print(f"{name:10s}: {a.status:6s} label {a.label}  p={a.probability:.3f}  top-3 "
          + ", ".join(f"{t['label']} {t['probability']:.2f}" for t in a.top))

fig, axes = plt.subplots(2, 3, figsize=(7, 4.6))
for col, (picture, a) in enumerate(zip([seven, one, scribble], answers, strict=True)):
    axes[0, col].imshow(np.asarray(picture), cmap="gray", vmin=0, vmax=255)
    axes[0, col].set_title(["drawn with PIL (200x200)", "a numpy array (120x120)", "a scribble"][col], fontsize=9)
    axes[1, col].imshow(a.image, cmap="gray")  # (28, 28): what the model saw after preprocessing
    axes[1, col].set_title(f"model's view: {a.label} ({a.probability:.2f}, {a.status})", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()

assert answers[0].label == "7" and answers[0].status == "ok", answers[0]
assert answers[1].label == "1" and answers[1].status == "ok", answers[1]
assert answers[2].status == "unsure", answers[2]

# %% [markdown]
# Is "unsure" a reliable alarm? The threshold was chosen on validation digits, which never
# included a scribble. Over all 20 scribbles, and over the 360 test digits:

# %%
on_scribbles = clf.predict(scribbles)
unsure_scribbles = np.mean([a.status == "unsure" for a in on_scribbles])
on_digits = torch.softmax(clf.logits(load_dataset("digits").test_images.numpy()) / clf.temperature, 1).amax(1)
unsure_digits = (on_digits < clf.threshold).float().mean().item()
print("scribbles:", ", ".join(f"{a.label} {a.probability:.2f}" for a in on_scribbles))
print(f"called unsure: {unsure_scribbles:.0%} of the scribbles, {unsure_digits:.1%} of the test digits")
assert unsure_scribbles > 2 * unsure_digits, "a scribble is called unsure far more often than a digit"
assert unsure_scribbles < 0.5, "but most scribbles still get a confident digit"

# %% [markdown]
# The alarm catches some scribbles, not most: a classifier that knows ten answers gives one of them
# to anything, often with confidence, and a threshold fitted on digits cannot know what a scribble
# looks like. Recognising pictures unlike the training data is a problem of its own; docs/deploy.md
# measures how often the served model accepts pictures that are not digits.
#
# The probabilities are **calibrated**: logits divided by the temperature before the softmax.
# `clf.logits` gives the raw logits of prepared `(N, 28, 28)` uint8 views, so the probability can be
# recomputed by hand:

# %%
views = np.stack([a.image for a in answers])  # (3, 28, 28) uint8: the three model views
logits = clf.logits(views)  # (3, 10)
probs = torch.softmax(logits / clf.temperature, dim=1)  # (3, 10) calibrated probabilities
by_hand = probs.max(1).values.numpy()
print("top probability by hand:", np.round(by_hand, 4), "| predict():", [round(a.probability, 4) for a in answers])
assert np.allclose(by_hand, [a.probability for a in answers], atol=1e-5), "predict = softmax(logits / T)"

# %% [markdown]
# ## ONNX: the model as a file any runtime can read
#
# `mnistlab export RUN --format onnx` writes `RUN/model.onnx` (a graph with a dynamic batch size
# and the run's classes, normalisation and calibration as metadata), and refuses to write it unless
# onnxruntime reproduces PyTorch's logits. Here the same function from Python, and the check redone
# on 64 test digits:

# %%
from mnistlab.deploy.export import export_onnx, onnx_logits  # noqa: E402  (needs the export extra)

onnx_path = export_onnx(run.path)  # = `mnistlab export RUN`
ds = load_dataset("digits")
x = to_input(ds.test_images[:64], ds.mean, ds.std)  # (64, 1, 28, 28) normalised test digits
with torch.no_grad():
    want = clf.model(x).numpy()  # (64, 10) PyTorch
got = onnx_logits(onnx_path, x.numpy())  # (64, 10) onnxruntime
print(f"{onnx_path.name}: {onnx_path.stat().st_size / 1024:.0f} KiB | max |onnxruntime - torch| = "
      f"{np.abs(got - want).max():.1e}")
assert np.allclose(got, want, atol=1e-4, rtol=1e-4), "onnxruntime computes PyTorch's logits"
assert (got.argmax(1) == want.argmax(1)).all()

# %% [markdown]
# ## int8: a quarter of the bytes
#
# `mnistlab export RUN --quantize int8` stores the weights as 8-bit integers (one scale per output
# channel), calibrated on training images, and writes the file only if it agrees with the fp32
# model. `mnistlab.load(run, precision="int8")` then answers with it. How much does it change?

# %%
from mnistlab.deploy.quantize import quantize_run  # noqa: E402

int8_path, check = quantize_run(run.path)  # = `mnistlab export RUN --quantize int8`
clf8 = mnistlab.load(run.path, precision="int8")
test_views = ds.test_images.numpy()  # (360, 28, 28) uint8
agree = (clf8.logits(test_views).argmax(1) == clf.logits(test_views).argmax(1)).float().mean().item()
acc8 = (clf8.logits(test_views).argmax(1) == ds.test_labels).float().mean().item()
print(f"{int8_path.name}: {int8_path.stat().st_size / 1024:.0f} KiB against {onnx_path.stat().st_size / 1024:.0f} "
      f"KiB | same answer as fp32 on {agree:.1%} of the 360 test digits | int8 accuracy {acc8:.2%} "
      f"(fp32 {run.results['test_accuracy']:.2%})")
assert int8_path.stat().st_size < 0.5 * onnx_path.stat().st_size, "int8 weights take a quarter of fp32's bytes"
assert agree > 0.95, ("int8 gives fp32's answer on nearly every digit", agree)

# %% [markdown]
# ## The served page
#
# `mnistlab serve RUN` starts a web server: a page to draw on at `/`, and a JSON API,
# `POST /api/predict`. It binds 127.0.0.1 (this machine only). Here it runs as a separate process on
# a free port; we send it the PNG of the drawn 7 and compare its answer with the one from Python.
# The `finally` stops the server whatever happens.

# %%
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # the system picks a free port
        return s.getsockname()[1]


port = free_port()
server = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", str(run.path), "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
try:
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:  # wait until the server answers /healthz
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                health = json.load(r)
                break
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.time() < deadline, "the server did not start within two minutes"
            time.sleep(0.3)
    png = BytesIO()
    seven.save(png, format="PNG")
    request = urllib.request.Request(f"{base}/api/predict", data=png.getvalue(),
                                     headers={"Content-Type": "image/png"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        served = json.load(r)
finally:
    server.terminate()
    server.wait(timeout=30)

local = clf.predict(seven)
print("healthz:", health)
print(f"server : {served['status']} {served['label']} p={served['probability']:.4f}")
print(f"python : {local.status} {local.label} p={local.probability:.4f}")
assert served["label"] == local.label and served["status"] == local.status, (served, local)
assert abs(served["probability"] - local.probability) < 1e-6, "the same model, preprocessing and calibration"
assert server.returncode is not None, "the server is stopped"

# %% [markdown]
# ## The same run on two processes: torchrun
#
# `torchrun --nproc-per-node N -m mnistlab train ...` trains one run on N processes with
# DistributedDataParallel: each process takes a share of every batch, and the gradients are
# averaged before each step, so with the same global batch a step is the same step.
# docs/distributed.md states it for models without BatchNorm, dropout or augmentation (the MLP is
# one): "Training and validation accuracies are equal, losses within 1e-4." Here the run above,
# again, on 2 processes (each one thread) with the command
#
#     torchrun --standalone --nproc-per-node 2 -m mnistlab train --dataset digits --model mlp --epochs 10 --seed 0

# %%
doc = (Path.cwd().parent / "docs" / "distributed.md").read_text()  # the notebooks run in notebooks/
assert "Training and validation accuracies are equal, losses within 1e-4." in doc
command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # = torchrun
           "-m", "mnistlab", "train", "--dataset", "digits", "--model", "mlp", "--epochs", "10", "--seed", "0",
           "--threads", "1", "--run-dir", str(work / "ddp")]
done = subprocess.run(command, capture_output=True, text=True, timeout=300)
assert done.returncode == 0, done.stderr[-2000:]
ddp = json.loads((work / "ddp" / "results.json").read_text())
print(f"1 process : test accuracy {run.results['test_accuracy']:.4%}, validation {run.results['val_accuracy']:.4%}")
print(f"2 processes: test accuracy {ddp['test_accuracy']:.4%}, validation {ddp['val_accuracy']:.4%} "
      f"(world size {ddp['world_size']})")
assert ddp["world_size"] == 2
assert ddp["test_accuracy"] == run.results["test_accuracy"], "2 processes reach the 1-process accuracy"
assert ddp["val_accuracy"] == run.results["val_accuracy"]
assert abs(ddp["test_loss"] - run.results["test_loss"]) < 1e-4

# %% [markdown]
# On one 2-core machine the two processes share the same two cores, so there is nothing to gain in
# speed (docs/distributed.md measured 0.95x); the point is that the same command runs on several
# machines or GPUs, where each process brings its own compute.
#
# ## Where next
#
# This is the end of the path. From here: `mnistlab serve RUN` and open the page to draw on;
# docs/deploy.md (calibration, robustness, load, the int8 and bf16 runtimes); docs/distributed.md
# (torchrun, restarts, what DDP sends); and the lab that goes with every chapter, `mnistlab lab`.
