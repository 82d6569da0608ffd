"""train.grad_checkpointing: the encoder's blocks recompute their activations in the backward pass.

The same loss, gradients and batch-norm statistics as without it; a model without support is exit 2.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from conftest import tiny_finetune_config, write_colour_images, write_yaml
from ptft import checkpoint as ckpt
from ptft.errors import UserError
from ptft.models import MODELS, enable_grad_checkpointing


# Fixed weights and inputs in every test (conftest.seeded_torch).
pytestmark = pytest.mark.usefixtures("seeded_torch")


def build(name: str, input_shape=(3, 32, 32), **options):
    return MODELS.get(name)(input_shape, 3, **options).train()


def loss_and_grads(model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws in every pass
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def tiny_vits(monkeypatch):
    """torchvision's VisionTransformer with 2 blocks of width 32 wherever ptft builds a ViT: ptft's path, fast."""
    build_library_model = torchvision.models.get_model

    def get_model(arch, **kwargs):
        if not arch.startswith("vit_"):
            return build_library_model(arch, **kwargs)
        patch = int(arch.rsplit("_", 1)[1])
        return torchvision.models.VisionTransformer(kwargs["image_size"], patch, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:vit_b_16"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name, tiny_vits):
    input_shape = (3, 32, 32)
    plain = build(name, input_shape)
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed, name)
    x = torch.rand(4, *input_shape)
    loss, grads = loss_and_grads(plain, x)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, x)
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(plain.parameters()))
    for key in grads:
        assert torch.allclose(grads[key], grads_ckpt[key], rtol=1e-5, atol=1e-7), key


def test_batch_norm_running_statistics_move_once_per_step_with_grad_checkpointing():
    plain = build("torchvision:resnet18")
    checkpointed = copy.deepcopy(plain)
    checkpointed.encoder.set_grad_checkpointing(True)
    x = torch.rand(4, 3, 32, 32)
    loss_and_grads(plain, x)
    loss_and_grads(checkpointed, x)
    buffers = dict(plain.named_buffers())
    for name, buffer in checkpointed.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert checkpointed.encoder.layer1[0].bn1.num_batches_tracked.item() == 1


def test_grad_checkpointing_recomputes_each_block_in_the_backward_pass():
    model = build("torchvision:resnet18")
    calls = []
    # A layer inside the block: the block's own hooks run once around its (checkpointed) forward.
    model.encoder.layer2[0].conv1.register_forward_hook(lambda module, args, output: calls.append(1))
    loss_and_grads(model, torch.rand(2, 3, 32, 32))
    assert len(calls) == 1
    model.encoder.set_grad_checkpointing(True)
    calls.clear()
    loss_and_grads(model, torch.rand(2, 3, 32, 32))
    assert len(calls) == 2  # the forward, then its recomputation during backward
    model.encoder.set_grad_checkpointing(False)
    calls.clear()
    loss_and_grads(model, torch.rand(2, 3, 32, 32))
    assert len(calls) == 1


def test_grad_checkpointing_of_a_timm_network_with_batch_norm_is_refused():
    pytest.importorskip("timm")
    with pytest.raises(UserError, match="train.grad_checkpointing: model.name 'timm:resnet18'.*batch norm"):
        enable_grad_checkpointing(build("timm:resnet18"), "timm:resnet18")


def test_grad_checkpointing_of_a_model_without_support_exits_2_naming_key_and_model(tmp_path, ptft):
    cfg = tiny_finetune_config(tmp_path / "run", None, model={"name": "tiny_conv_classifier"},
                               train={"grad_checkpointing": True, "max_steps": 1})
    result = ptft("finetune", write_yaml(tmp_path / "c.yaml", cfg))
    assert result.code == 2 and "Traceback" not in result.stderr
    assert "train.grad_checkpointing" in result.stderr and "'tiny_conv_classifier'" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory) -> Path:
    """RGB 32x32 images of 3 classes: 8 train, 2 test per class."""
    return write_colour_images(tmp_path_factory.mktemp("images"), 32, 8, 2)


@pytest.mark.slow  # two resnet18 runs: about 10 s of CPU
def test_training_with_grad_checkpointing_ends_with_the_same_weights(tmp_path, ptft, colour_images):
    weights = []
    for on in (False, True):
        cfg = {"run": {"dir": str(tmp_path / str(on)), "seed": 0},
               "data": {"name": "imagefolder", "root": str(colour_images), "batch_size": 8, "val_fraction": 0.25},
               "model": {"name": "torchvision:resnet18"}, "objective": {"name": "supervised"},
               "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
               "train": {"max_steps": 2, "eval_every_steps": 2, "device": "cpu", "grad_checkpointing": on},
               "checkpoint": {"keep_last": 1}}
        result = ptft("pretrain", write_yaml(tmp_path / f"{on}.yaml", cfg))
        assert result.code == 0, result.stderr
        weights.append(load_file(ckpt.resolve_checkpoint(Path(result.last_line)) / "model.safetensors"))
    plain, checkpointed = weights
    assert plain.keys() == checkpointed.keys()
    for key in plain:  # running statistics included: they moved once per step either way
        assert torch.allclose(plain[key], checkpointed[key], rtol=1e-5, atol=1e-6), key
