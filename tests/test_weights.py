"""Foreign weights: every source format, key normalisation, the key report and its refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ptft import checkpoint as ckpt
from ptft.errors import CheckpointError
from ptft.meta import CheckpointMeta
from ptft.weights import KeyReport, match_into, normalise_keys, read_state_dict


class TinyEncoder(nn.Module):
    """(N, C, 4, 4) -> (N, 3): a first conv, batch norm, and a linear layer."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.proj = nn.Linear(2 * 4 * 4, 3)


class TinyClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 5):
        super().__init__()
        self.encoder = TinyEncoder(in_channels)
        self.head = nn.Linear(3, num_classes)


class TinyAutoEncoder(nn.Module):
    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.encoder = TinyEncoder(in_channels)
        self.decoder = nn.Linear(3, 16)


# conv.weight, conv.bias, norm.{weight, bias, running_mean, running_var, num_batches_tracked}, proj.{weight, bias}
ENCODER_KEYS = 9


def seeded(module_class, *args, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return module_class(*args, **kwargs)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def keep_global_rng():
    """Tests seed the global generator to build modules; restore it so nothing leaks."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture
def source_state() -> dict[str, torch.Tensor]:
    return seeded(TinyClassifier, seed=1).state_dict()


@pytest.mark.parametrize("filename, wrap", [
    ("plain.pt", lambda s: s),
    ("plain.pth", lambda s: {"model_state_dict": s, "epoch": 3}),
    ("ddp.bin", lambda s: {f"module.{k}": v for k, v in s.items()}),
    ("compiled.pt", lambda s: {f"_orig_mod.module.{k}": v for k, v in s.items()}),
    ("lightning.ckpt", lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "epoch": 1,
                                  "optimizer_states": [{"lr": 0.1}]}),
])
def test_torch_file_formats_read_to_ptft_names(tmp_path, source_state, filename, wrap):
    path = tmp_path / filename
    torch.save(wrap(source_state), path)
    assert same_tensors(read_state_dict(path), source_state)


def test_safetensors_file_and_ptft_checkpoint(tmp_path, source_state):
    save_file({f"module.{k}": v.contiguous() for k, v in source_state.items()}, tmp_path / "w.safetensors")
    assert same_tensors(read_state_dict(tmp_path / "w.safetensors"), source_state)
    step = ckpt.save_checkpoint(tmp_path / "run", source_state, {}, CheckpointMeta(step=3), best=True, keep_last=1)
    for form in (step, tmp_path / "run", tmp_path / "run" / "checkpoints" / "best"):
        assert same_tensors(read_state_dict(form), source_state)


def test_prefix_map_applies_longest_prefix_first(tmp_path):
    weight = torch.ones(1)
    torch.save({"backbone.stem.w": weight, "backbone.x": weight, "classifier.b": weight}, tmp_path / "w.pt")
    prefix_map = {"backbone.": "encoder.", "backbone.stem.": "encoder.conv.", "classifier.": "head."}
    state = read_state_dict(tmp_path / "w.pt", prefix_map=prefix_map)
    assert sorted(state) == ["encoder.conv.w", "encoder.x", "head.b"]


def test_normalise_keys_wrappers_lightning_and_torchvision():
    t = torch.zeros(1)
    assert list(normalise_keys({"module._orig_mod.module.encoder.w": t})) == ["encoder.w"]
    assert list(normalise_keys({"encoder._orig_mod.w": t})) == ["encoder.w"]
    # Lightning's `model.` goes only when what remains is ptft's; a loss's weights keep their name.
    assert sorted(normalise_keys({"model.encoder.w": t, "criterion.weight": t})) == ["criterion.weight", "encoder.w"]
    assert list(normalise_keys({"model.layers.0.w": t})) == ["model.layers.0.w"]
    torchvision = {"conv1.weight": t, "bn1.bias": t, "layer1.0.conv1.weight": t, "fc.weight": t, "fc.bias": t}
    assert sorted(normalise_keys({f"model.{k}": v for k, v in torchvision.items()})) == [
        "encoder.bn1.bias", "encoder.conv1.weight", "encoder.layer1.0.conv1.weight", "head.bias", "head.weight"]
    assert list(normalise_keys({"w": t}, {"": "encoder."})) == ["encoder.w"]


def test_unreadable_or_unsupported_sources_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent.pt do not exist \(expected a ptft checkpoint"):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"w.npz: unsupported file type '.npz'"):
        read_state_dict(tmp_path / "w.npz")
    torch.save({"epoch": 3, "notes": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta.pt hold no tensors"):
        read_state_dict(tmp_path / "meta.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(CheckpointError, match=r"broken.safetensors: unreadable safetensors file"):
        read_state_dict(tmp_path / "broken.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir is not a checkpoint"):
        read_state_dict(tmp_path / "empty_dir")


def test_foreign_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"encoder.w": torch.ones(1)}, "hparams": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refused"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_autoencoder_into_classifier_report_counts_and_values():
    autoencoder = seeded(TinyAutoEncoder, seed=1)
    model = seeded(TinyClassifier, seed=2)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    extra = {"objective.projector.weight": torch.zeros(2, 2)}
    report = match_into(model, {**autoencoder.state_dict(), **extra}, load_head=False, strict=True)
    assert report.counts() == {"loaded": ENCODER_KEYS, "adapted": 0, "skipped_head": 0, "missing": 2,
                               "unexpected": 3, "shape_mismatched": 0}
    assert report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == ["decoder.weight", "decoder.bias", "objective.projector.weight"]
    assert same_tensors(model.encoder.state_dict(), autoencoder.encoder.state_dict())
    assert same_tensors(model.head.state_dict(), fresh_head)


def test_head_skipped_on_class_change_and_loaded_with_load_head(source_state):
    five_classes = seeded(TinyClassifier, num_classes=5, seed=2)
    report = match_into(five_classes, source_state, load_head=False, strict=False)
    assert report.skipped_head == ["head.weight", "head.bias"] and report.counts()["loaded"] == ENCODER_KEYS
    assert not torch.equal(five_classes.head.weight, source_state["head.weight"])

    report = match_into(five_classes, source_state, load_head=True, strict=False)
    assert report.skipped_head == [] and report.counts()["loaded"] == ENCODER_KEYS + 2
    assert torch.equal(five_classes.head.weight, source_state["head.weight"])

    ten_classes = seeded(TinyClassifier, num_classes=10, seed=2)
    fresh = ten_classes.head.weight.detach().clone()
    report = match_into(ten_classes, source_state, load_head=True, strict=True)
    assert report.skipped_head == ["head.weight", "head.bias"] and report.shape_mismatched == []
    assert torch.equal(ten_classes.head.weight, fresh)


def test_rgb_first_conv_is_summed_into_a_grey_model():
    rgb = seeded(TinyClassifier, in_channels=3, seed=1).state_dict()
    grey = seeded(TinyClassifier, in_channels=1, seed=2)
    report = match_into(grey, rgb, load_head=True, strict=True)
    assert report.adapted == ["encoder.conv.weight"]
    assert report.counts()["loaded"] == ENCODER_KEYS - 1 + 2
    assert torch.equal(grey.encoder.conv.weight, rgb["encoder.conv.weight"].sum(dim=1, keepdim=True))
    # A grey image replicated into 3 channels gives the RGB conv's exact response.
    x = torch.rand(2, 1, 4, 4)
    conv_rgb = nn.Conv2d(3, 2, 3, padding=1)
    conv_rgb.load_state_dict({"weight": rgb["encoder.conv.weight"], "bias": rgb["encoder.conv.bias"]})
    torch.testing.assert_close(grey.encoder.conv(x), conv_rgb(x.expand(-1, 3, -1, -1)))


def test_shape_mismatch_is_reported_and_strict_refuses_it(source_state):
    model = seeded(TinyClassifier, seed=2)
    model.encoder.proj = nn.Linear(2 * 4 * 4, 4)
    model.head = nn.Linear(4, 5)
    report = match_into(model, source_state, load_head=False, strict=False)
    assert report.shape_mismatched == [("encoder.proj.weight", (3, 32), (4, 32)), ("encoder.proj.bias", (3,), (4,))]
    assert report.counts()["loaded"] == ENCODER_KEYS - 2
    with pytest.raises(CheckpointError, match=r"w.pt: init.strict is true but 2 encoder.\* key\(s\) .*"
                                              r"encoder.proj.weight \(file 3x32, model 4x32\)"):
        match_into(model, source_state, load_head=False, strict=True, source="w.pt")


def test_strict_refuses_missing_encoder_keys_and_leaves_model_untouched(source_state):
    partial = {k: v for k, v in source_state.items() if not k.startswith("encoder.norm.")}
    model = seeded(TinyClassifier, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"4 encoder.\* key\(s\) .*encoder.norm.weight \(missing\)"):
        match_into(model, partial, load_head=True, strict=True)
    assert same_tensors(model.state_dict(), before)
    # num_batches_tracked is torch's own counter: never missing (see the next test).
    assert match_into(model, partial, load_head=True, strict=False).missing == [
        "encoder.norm.weight", "encoder.norm.bias", "encoder.norm.running_mean", "encoder.norm.running_var"]


def test_batch_norm_counters_absent_from_old_files_are_not_missing(source_state):
    # torchvision's original ImageNet files predate the num_batches_tracked buffer.
    old_format = {k: v for k, v in source_state.items() if not k.endswith("num_batches_tracked")}
    model = seeded(TinyClassifier, seed=2)
    report = match_into(model, old_format, load_head=True, strict=True)
    assert report.missing == [] and report.counts()["loaded"] == ENCODER_KEYS - 1 + 2
    assert int(model.encoder.norm.num_batches_tracked) == 0  # the fresh model's own count stays


def test_zero_encoder_keys_lists_the_common_prefixes(source_state):
    foreign = {k.replace("encoder.", "backbone."): v for k, v in source_state.items()}
    foreign["stats.mean"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        match_into(seeded(TinyClassifier, seed=2), foreign, load_head=True, strict=False, source="foreign.pt")
    assert str(info.value).startswith("foreign.pt: no encoder.* key of the model was loaded")
    assert "prefixes are backbone. (9), head. (2), stats. (1)" in str(info.value)
    assert "init.prefix_map={backbone.: encoder.}" in str(info.value)
    remapped = normalise_keys(foreign, {"backbone.": "encoder."})
    assert match_into(seeded(TinyClassifier, seed=2), remapped, load_head=True, strict=True).counts()["loaded"] == 11


def test_zero_encoder_keys_explains_shape_mismatch(source_state):
    model = seeded(TinyClassifier, in_channels=2, seed=2)  # 2 input channels: the conv cannot be adapted
    only_conv = {k: v for k, v in source_state.items() if k.startswith("encoder.conv.weight")}
    with pytest.raises(CheckpointError, match=r"1 encoder.\* key\(s\) matched by name but not by shape "
                                              r"\(e.g. encoder.conv.weight: file 2x1x3x3, model 2x2x3x3\)"):
        match_into(model, only_conv, load_head=False, strict=False)


def test_report_as_dict_and_rows():
    report = KeyReport(loaded=["encoder.a", "encoder.b", "encoder.c", "encoder.d"], missing=["head.weight"],
                       shape_mismatched=[("encoder.e", (3, 2), (4, 2))])
    data = report.as_dict()
    assert data["counts"] == {"loaded": 4, "adapted": 0, "skipped_head": 0, "missing": 1, "unexpected": 0,
                              "shape_mismatched": 1}
    assert data["shape_mismatched"] == [{"name": "encoder.e", "file": [3, 2], "model": [4, 2]}]
    assert data["loaded"] == ["encoder.a", "encoder.b", "encoder.c", "encoder.d"]
    rows = report.rows()
    assert rows[0] == ("loaded", 4, "encoder.a, encoder.b, encoder.c, ...")
    assert rows[3] == ("missing", 1, "head.weight")
    assert rows[5] == ("shape mismatched", 1, "encoder.e (file 3x2, model 4x2)")
    assert [r[0] for r in rows] == ["loaded", "adapted", "skipped head", "missing", "unexpected", "shape mismatched"]


def test_torchvision_resnet_maps_onto_ptft_resnet_encoder():
    torchvision = pytest.importorskip("torchvision")
    resnet = pytest.importorskip("ptft.models.resnet")
    from ptft.models.compose import Classifier

    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None).state_dict()  # fc: 1000 classes, 3-channel conv1
    model = Classifier(resnet.ResNetEncoder("resnet18", in_channels=1, small_input=False), nn.Linear(512, 10))
    report = match_into(model, normalise_keys(source), load_head=True, strict=True)
    assert report.adapted == ["encoder.conv1.weight"]
    assert report.skipped_head == ["head.weight", "head.bias"]
    assert report.counts()["loaded"] == len(source) - 3
    assert report.missing == report.unexpected == report.shape_mismatched == []
    assert torch.equal(model.encoder.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])


@pytest.mark.parametrize("small_input_file, small_input_model, fix", [
    (False, True, "model.small_input=false"), (True, False, "model.small_input=true")])
def test_resnet_stem_mismatch_names_the_small_input_option(small_input_file, small_input_model, fix):
    resnet = pytest.importorskip("ptft.models.resnet")
    from ptft.models.compose import Classifier

    def build(small_input: bool) -> Classifier:
        return Classifier(resnet.ResNetEncoder("resnet18", in_channels=3, small_input=small_input), nn.Linear(512, 10))

    source = seeded(build, small_input_file).state_dict()
    with pytest.raises(CheckpointError) as info:
        match_into(build(small_input_model), source, load_head=False, strict=True, source="r18.pth")
    message = str(info.value)
    assert "encoder.conv1.weight" in message and fix in message
    assert message.index(fix) < message.index("init.strict=false")  # the fix first, the workaround after


class ToyLibraryNet(nn.Module):
    """A library's classification network as its files name it: stem, block, classifier `fc`."""

    def __init__(self, in_channels: int = 3, num_classes: int = 7):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 2, kernel_size=3, padding=1)
        self.block = nn.Linear(2 * 4 * 4, 4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x).flatten(1)))


def toy_library_classifier(in_channels: int = 1, num_classes: int = 5, renames=()) -> TinyClassifier:
    from ptft.models.backbones import LibraryEncoder
    from ptft.models.compose import Classifier

    net = ToyLibraryNet(in_channels)
    net.fc = nn.Identity()
    layers = {"stem.weight": 0, "stem.bias": 0, "block.weight": 1, "block.bias": 1}
    encoder = LibraryEncoder(net, out_features=4, layer_ids=layers, library_head="fc.", stem="stem.weight",
                             legacy_renames=renames)
    return Classifier(encoder, nn.Linear(4, num_classes))


def test_library_file_maps_onto_the_encoder_and_its_classifier_onto_the_head():
    source = seeded(ToyLibraryNet, seed=2).state_dict()  # RGB stem, 7 classes
    model = toy_library_classifier()
    report = match_into(model, source, load_head=False, strict=True)
    assert report.loaded == ["encoder.stem.bias", "encoder.block.weight", "encoder.block.bias"]
    assert report.adapted == ["encoder.stem.weight"] and report.skipped_head == ["head.weight", "head.bias"]
    assert report.missing == report.unexpected == report.shape_mismatched == []
    assert torch.equal(model.encoder.stem.weight, source["stem.weight"].sum(1, keepdim=True))
    same_classes = toy_library_classifier(in_channels=3, num_classes=7)
    match_into(same_classes, source, load_head=True, strict=True)
    assert torch.equal(same_classes.head.weight, source["fc.weight"])


def test_ptft_checkpoint_of_a_library_model_is_not_renamed():
    source = seeded(toy_library_classifier, seed=3).state_dict()
    assert sorted(source) == ["encoder.block.bias", "encoder.block.weight", "encoder.stem.bias",
                              "encoder.stem.weight", "head.bias", "head.weight"]
    report = match_into(toy_library_classifier(), source, load_head=True, strict=True)
    assert report.counts() == {"loaded": 6, "adapted": 0, "skipped_head": 0, "missing": 0, "unexpected": 0,
                               "shape_mismatched": 0}


def test_older_library_names_are_renamed_before_matching():
    source = {k.replace("block.", "dense."): v for k, v in seeded(ToyLibraryNet, 1, seed=4).state_dict().items()}
    model = toy_library_classifier(renames=((r"^dense\.", "block."),))
    report = match_into(model, source, load_head=False, strict=True)
    assert report.unexpected == [] and "encoder.block.weight" in report.loaded
    assert torch.equal(model.encoder.block.weight, source["dense.weight"])


def test_position_embedding_resampling_keeps_prefix_tokens_and_smooth_grids():
    from ptft.models.backbones import resample_position_embedding

    constant = torch.cat([torch.full((1, 1, 6), -1.0), torch.full((1, 16, 6), 0.5)], dim=1)  # class token + 4x4 grid
    resized = resample_position_embedding(constant, 1, (2, 2), torch.Size([1, 5, 6]))
    assert resized.shape == (1, 5, 6) and torch.equal(resized[:, 0], constant[:, 0])
    assert torch.allclose(resized[:, 1:], torch.full((1, 4, 6), 0.5))
    assert resample_position_embedding(constant, 1, (2, 2), torch.Size([1, 5, 8])) is None  # another width
    assert resample_position_embedding(constant[:, :-1], 1, (2, 2), torch.Size([1, 5, 6])) is None  # not square
