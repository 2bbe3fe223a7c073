"""huggingface_hub's loading convention for an exported model folder: MnistlabModel.from_pretrained(DIR).

    from mnistlab.deploy.hub import MnistlabModel
    model = MnistlabModel.from_pretrained("digits-cnn")          # a folder from `mnistlab export --format hf`
    model = MnistlabModel.from_pretrained("user/digits-cnn")     # the same folder uploaded to the Hub
    logits = model(x)                                            # x: (N, 1, 28, 28), (pixel/255 - mean)/std

PyTorchModelHubMixin's own loader would build the class from config.json's keys and load the weights
with strict=False by default and no checksum; _from_pretrained is the hook the mixin documents for a
library's own format, so here it reads the folder with read_model_folder: the architecture is rebuilt
from mnistlab's registry (no code from the folder or the Hub runs, only JSON and safetensors are read),
the weights are loaded strictly and checked against the sha256 recorded at export. Offline use:
HF_HUB_OFFLINE=1, or a local folder (nothing is downloaded for one). Needs pip install "mnistlab[hub]".
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mnistlab.deploy.model_folder import CONFIG, WEIGHTS, read_model_folder
from mnistlab.errors import UserError

try:
    from huggingface_hub import PyTorchModelHubMixin, snapshot_download
except ImportError:
    raise UserError('loading with huggingface_hub needs it installed: pip install "mnistlab[hub]"') from None


class MnistlabModel(torch.nn.Module, PyTorchModelHubMixin, library_name="mnistlab",
                    tags=["mnistlab", "image-classification"]):
    """An exported mnistlab model: `.model` the registry's torch module, `.meta` read_model_folder's metadata."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.meta = model, meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) of normalised images x (N, C, 28, 28)."""
        return self.model(x)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, map_location: str = "cpu", strict: bool = True,
                         **config: Any) -> MnistlabModel:
        if not strict:
            raise UserError("an mnistlab model folder loads strictly (every tensor, of its shape, nothing else)")
        folder = model_id if os.path.isdir(model_id) else snapshot_download(
            repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token, allow_patterns=[CONFIG, WEIGHTS])
        model, meta = read_model_folder(folder)
        return cls(model.to(map_location), meta).eval()

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a folder is written from its run, with its card (`mnistlab export RUN --format hf`)."""
        raise UserError("an mnistlab model folder is written from its run folder: "
                        "mnistlab export RUN_DIR --format hf -o DIR (upload it with huggingface-cli upload)")
