"""checkpoint.py on small models, no training: the round trip, the payload hash and its version rule, and
one clear line for every way a checkpoint can fail to load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from mnistlab.checkpoint import (
    FORMAT_VERSION,
    NonFiniteCheckpoint,
    load_into,
    load_model,
    payload_sha256,
    prefixed,
    read_checkpoint,
    require_meta,
    save_checkpoint,
    write_tensors,
)
from mnistlab.errors import UserError

META = dict(model="linear", model_kwargs={}, in_chans=1, num_classes=10, step=7)


def trained_linear(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The registry's linear model after one SGD step with momentum: weights and optimizer state non-default."""
    from mnistlab.models import create_model

    torch.manual_seed(seed)
    model = create_model("linear")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    return model, optimizer


def raw_checkpoint(path, tensors: dict[str, torch.Tensor], meta) -> None:
    """A safetensors file written by hand, with `meta` as the mnistlab metadata (no hash added)."""
    path.write_bytes(st_save(tensors, metadata={"mnistlab": json.dumps(meta)}))


@pytest.fixture
def saved(tmp_path):
    model, optimizer = trained_linear()
    state = optimizer.state[next(iter(model.parameters()))]
    state["passes"] = 3  # a state entry that is not a tensor
    state["seen/total"], state["trace/sum"] = 5, torch.ones(2)  # keys holding the separator itself
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, META, optimizer, extra={"ema": torch.arange(3.0)})
    return path, model, optimizer


def test_weights_optimizer_state_and_extra_tensors_come_back_as_saved(saved):
    path, model, optimizer = saved
    fresh, fresh_optimizer = trained_linear(seed=1)
    meta, extra = load_into(path, fresh, fresh_optimizer)
    assert meta["step"] == 7 and meta["format_version"] == FORMAT_VERSION == 2
    assert torch.equal(extra["ema"], torch.arange(3.0)) and list(extra) == ["ema"]
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], fresh_optimizer.state[q]["momentum_buffer"])
    first = next(iter(fresh.parameters()))
    assert fresh_optimizer.state[first]["passes"] == 3 and fresh_optimizer.state[first]["seen/total"] == 5
    assert torch.equal(fresh_optimizer.state[first]["trace/sum"], torch.ones(2))
    assert fresh_optimizer.param_groups[0]["momentum"] == 0.9


def test_load_model_rebuilds_the_model_from_the_file_alone(saved):
    path, model, _ = saved
    loaded, meta = load_model(path)
    assert meta["model"] == "linear" and not loaded.training
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_read_already_made_is_not_read_again(saved, tmp_path):
    path, model, optimizer = saved
    read = read_checkpoint(path)
    gone = tmp_path / "moved-away.safetensors"  # nothing there: only `read` can supply the tensors
    loaded, meta = load_model(gone, read=read)
    meta2, _ = load_into(gone, trained_linear(seed=1)[0], read=read)
    assert meta["step"] == meta2["step"] == 7


def test_the_optimizer_state_keeps_a_channels_last_weights_layout(tmp_path):
    """A fused optimizer walks param and momentum as flat memory: they must share the layout."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "c.safetensors", model, {}, optimizer)
    fresh = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    load_into(tmp_path / "c.safetensors", fresh, fresh_optimizer)
    buffer = fresh_optimizer.state[fresh.weight]["momentum_buffer"]
    assert buffer.stride() == fresh.weight.stride()
    assert torch.equal(buffer, optimizer.state[model.weight]["momentum_buffer"])


# ---- the payload hash -------------------------------------------------------------------------------

def test_the_payload_hash_covers_names_dtypes_shapes_and_bytes_in_any_order():
    base = {"a": torch.arange(4.0), "b": torch.zeros(0)}
    digest = payload_sha256(base)
    assert payload_sha256({"b": torch.zeros(0), "a": torch.arange(4.0)}) == digest  # insertion order: no matter
    for changed in ({"c": torch.arange(4.0), "b": torch.zeros(0)},  # a name
                    {"a": torch.arange(4.0).double(), "b": torch.zeros(0)},  # a dtype
                    {"a": torch.arange(4.0).reshape(2, 2), "b": torch.zeros(0)},  # a shape
                    {"a": torch.tensor([0.0, 1.0, 2.0, 5.0]), "b": torch.zeros(0)},  # a value
                    {"a": torch.arange(4.0), "b": torch.zeros(0, 1)}):  # an empty tensor's shape
        assert payload_sha256(changed) != digest


def test_the_payload_hash_is_the_documented_format_so_older_checkpoints_keep_loading():
    """sha256 over '<name>|<dtype>|<shape>|' and the raw bytes of each tensor, by name: a change to it would
    make every checkpoint saved before the change fail its check."""
    import hashlib

    tensors = {"b": torch.zeros(0), "a": torch.tensor([1.0, 2.0])}
    expected = hashlib.sha256(b"a|torch.float32|(2,)|" + tensors["a"].numpy().tobytes() + b"b|torch.float32|(0,)|")
    assert payload_sha256(tensors) == expected.hexdigest()


def test_a_checkpoint_whose_tensors_changed_after_saving_is_refused(tmp_path):
    tensors = {"model/w": torch.ones(3)}
    raw_checkpoint(tmp_path / "c", {"model/w": torch.full((3,), 2.0)},
                   {"format_version": 2, "payload_sha256": payload_sha256(tensors)})
    with pytest.raises(UserError, match=rf"^{tmp_path / 'c'}: the tensor data does not match the checksum recorded "
                                        r"when it was saved \(the file is damaged\); refusing to load it$"):
        read_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("version", [2, 3])
def test_a_checkpoint_of_version_2_or_later_stripped_of_its_hash_is_refused(tmp_path, version):
    raw_checkpoint(tmp_path / "c", {"model/w": torch.ones(3)}, {"format_version": version})
    with pytest.raises(UserError, match=rf"^{tmp_path / 'c'}: the checkpoint's metadata lacks payload_sha256$"):
        read_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("meta", [{"format_version": 1}, {}], ids=["version-1", "no-version"])
def test_a_version_1_checkpoint_has_no_hash_and_loads(tmp_path, meta):
    raw_checkpoint(tmp_path / "c", {"model/w": torch.ones(3)}, dict(meta, step=1))
    tensors, read_meta = read_checkpoint(tmp_path / "c")
    assert torch.equal(tensors["model/w"], torch.ones(3)) and read_meta["step"] == 1


# ---- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path, bad):
    tensors = {f"t{i}": torch.tensor([0.0, bad]) for i in range(7)}
    tensors["steps"] = torch.tensor([3])  # integer tensors have no NaN to check
    with pytest.raises(NonFiniteCheckpoint, match=r"^refusing to write a checkpoint with non-finite values in "
                                                  r"t0, t1, t2, t3, t4$") as caught:
        write_tensors(tmp_path / "c", tensors, {})
    assert caught.value.exit_code == 1 and not (tmp_path / "c").exists()


def test_finite_float_and_integer_tensors_are_written(tmp_path):
    write_tensors(tmp_path / "c", {"w": torch.ones(2), "n": torch.tensor([2**40])}, {"step": 3})
    tensors, meta = read_checkpoint(tmp_path / "c")
    assert meta == {"step": 3, "format_version": 2, "payload_sha256": payload_sha256(tensors)}


def test_metadata_is_strict_json(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_tensors(tmp_path / "c", {"w": torch.ones(1)}, {"best_loss": float("nan")})


def test_the_checkpoint_file_is_named_alike_in_both_modules_that_name_it():
    from mnistlab import checkpoint, run

    assert checkpoint.CHECKPOINT == run.CHECKPOINT == "checkpoint.safetensors"


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path / 'nothing.safetensors'}: no checkpoint there$"):
        read_checkpoint(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("content", [
    b"not a checkpoint at all",
    st_save({"w": torch.ones(1)}),  # a safetensors file of someone else's: no mnistlab metadata
    st_save({"w": torch.ones(1)}, metadata={"mnistlab": "{not json"}),
], ids=["garbage", "foreign", "bad-json"])
def test_a_file_that_is_not_an_mnistlab_checkpoint_is_one_line(tmp_path, content):
    (tmp_path / "c").write_bytes(content)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'c'}: not a readable mnistlab checkpoint \("):
        read_checkpoint(tmp_path / "c")


def test_metadata_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "c").write_bytes(st_save({"w": torch.ones(1)}, metadata={"mnistlab": "[1, 2]"}))
    with pytest.raises(UserError, match=rf"^{tmp_path / 'c'}: not a readable mnistlab checkpoint "
                                        r"\(its metadata is not an object\)$"):
        read_checkpoint(tmp_path / "c")


def test_require_meta_names_every_missing_key(tmp_path):
    require_meta({"a": 1, "b": 2}, ("a", "b"), tmp_path)
    with pytest.raises(UserError, match=rf"^{tmp_path}: the checkpoint's metadata lacks b, c$"):
        require_meta({"a": 1}, ("a", "b", "c"), tmp_path)


def test_a_checkpoint_that_does_not_fit_its_model_is_one_line(tmp_path):
    model, _ = trained_linear()
    save_checkpoint(tmp_path / "c", model, dict(META, num_classes=3))
    with pytest.raises(UserError, match=rf"^{tmp_path / 'c'}: the checkpoint does not fit the model it names \(Error"
                                        r"\(s\) in loading state_dict for SoftmaxRegression: size mismatch") as caught:
        load_model(tmp_path / "c")
    detail = str(caught.value).split(" names (", 1)[1]
    assert "\n" not in detail and "  " not in detail and len(detail) == 300 + len(")")  # torch's, cut to 300


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("in_chans"), r"c: the checkpoint's metadata lacks in_chans$"),
    (lambda m: m.update(model_kwargs={"width": "wide"}), r"c: cannot rebuild the model it names \("),
    (lambda m: m.update(model_kwargs=[1]), r"c: cannot rebuild the model it names \("),
])
def test_metadata_that_cannot_rebuild_a_model_is_one_line(tmp_path, edit, message):
    model, _ = trained_linear()
    meta = dict(META)
    edit(meta)
    save_checkpoint(tmp_path / "c", model, meta)
    with pytest.raises(UserError, match=rf"^{tmp_path}/{message}"):
        load_model(tmp_path / "c")


def test_optimizer_state_that_does_not_fit_this_run_is_one_line(tmp_path):
    model, optimizer = trained_linear()
    save_checkpoint(tmp_path / "no-optimizer", model, META)  # saved without one: nothing to restore
    save_checkpoint(tmp_path / "sgd", model, META, optimizer)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'no-optimizer'}: its optimizer state does not fit this run \("):
        load_into(tmp_path / "no-optimizer", model, optimizer)
    bigger = torch.nn.Linear(784, 10)
    wrong = torch.optim.SGD([*model.parameters(), *bigger.parameters()], lr=0.1, momentum=0.9)
    with pytest.raises(UserError, match=r"sgd: its optimizer state does not fit this run \("):
        load_into(tmp_path / "sgd", model, wrong)


def test_prefixed_takes_only_what_is_under_the_prefix():
    tensors = {"model/w": torch.ones(1), "model/sub/b": torch.zeros(1), "modelx/w": torch.ones(2),
               "extra/e": torch.ones(3)}
    assert sorted(prefixed(tensors, "model")) == ["sub/b", "w"]
    assert list(prefixed(tensors, "extra")) == ["e"]
