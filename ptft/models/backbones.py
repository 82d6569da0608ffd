"""A library's classification network as a ptft encoder, shared by the torchvision and timm families.

The encoder *is* the library's network with its last Linear replaced by an identity: it adopts the
network's modules, parameters and buffers under their own names, so its state-dict keys are the
library's (`encoder.` + `features.0.0.weight`), and a library weights file maps on as `encoder.` +
key, its classifier as `head.` (see weights.match_into). The network's own `forward` runs, so the
features are exactly what the library feeds its classifier: (N, C, H, W) -> (N, out_features).
"""

from __future__ import annotations

import contextlib
import math
import re
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ptft.errors import UserError


# LibraryEncoder's feature_map for networks whose `forward_features()` returns their last feature map (timm).
FORWARD_FEATURES = "forward_features()"


class LibraryEncoder(nn.Module):
    """A torchvision or timm network minus its classifier Linear, with ptft's encoder interface.

    Args:
        net: the network, its classifier Linear already replaced by `nn.Identity`.
        out_features: the width of the features the classifier took.
        layer_ids: parameter name -> depth (0 = the stem), for layer-wise lr decay.
        library_head: the key prefix of the library's classifier Linear (`fc.`, `classifier.2.`, `head.`),
            which a library file's head keys start with.
        stem: the name of the first conv's weight, for mismatch hints.
        position_embedding: (parameter name, prefix tokens, (grid h, grid w)) of a ViT's learned
            position embedding, resampled when a file was trained at another image size.
        legacy_renames: (regex, replacement) pairs renaming keys of older library files to today's.
        preprocessing: what the library says the pretrained weights expect (mean, std, input size).
        blocks: paths of the containers whose children are the blocks to checkpoint (`encoder.layers`);
            None: the network checkpoints itself (timm's `set_grad_checkpointing`).
        tokens: a ViT's patch-token steps (`PatchTokens`), for objectives that mask patches (mae).
        feature_map: where the network's last feature map (N, C', h, w), before its global pooling, comes
            from, for ptft's feature-map decoder (models/decoders.py): the path of the submodule that
            outputs it (`layer4`), or FORWARD_FEATURES (timm's method); None for transformers.
    """

    def __init__(self, net: nn.Module, *, out_features: int, layer_ids: dict[str, int], library_head: str,
                 stem: str, position_embedding: tuple[str, int, tuple[int, int]] | None = None,
                 legacy_renames: tuple[tuple[str, str], ...] = (), preprocessing: dict | None = None,
                 blocks: tuple[str, ...] | None = (), tokens: PatchTokens | None = None,
                 feature_map: str | None = None):
        super().__init__()
        # The same dicts, not copies: moving, loading or freezing this module acts on the network
        # whose forward runs, and the names stay the library's.
        self._modules = net._modules
        self._parameters = net._parameters
        self._buffers = net._buffers
        self._non_persistent_buffers_set = net._non_persistent_buffers_set
        object.__setattr__(self, "_net", net)  # unregistered: its state is already ours
        # Attribute names that no library network uses for a child (`stem`, `head` are taken).
        self.out_features = out_features
        self.num_layers = max(layer_ids.values()) + 1
        self._layer_ids = dict(layer_ids)
        self.library_head = library_head
        self.stem_weight = stem
        self._position_embedding = position_embedding
        self._legacy_renames = legacy_renames
        self.preprocessing = preprocessing
        self._blocks = blocks
        self.patch_tokens = tokens
        self._feature_map = feature_map

    def __getattr__(self, name: str):
        # The network's own attributes and methods (a ViT's image_size, timm's forward_features).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_net" not in self.__dict__:
                raise
            return getattr(self.__dict__["_net"], name)

    def train(self, mode: bool = True) -> LibraryEncoder:
        super().train(mode)
        self._net.training = mode  # the network's own flag, which its forward may read
        return self

    @property
    def has_feature_map(self) -> bool:
        """Whether `forward(x, feature_map=True)` works: a conv network's last feature map."""
        return self._feature_map is not None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, feature_map: bool = False) -> torch.Tensor:
        """(N, C, H, W) -> (N, out_features) features; with `keep`, a ViT's tokens of those patches only.

        `keep` (N, K) indices of the patches to encode (row-major over the patch grid) gives
        (N, prefix + K, D): the class token and the kept patches after the last block and norm.
        `feature_map` gives the last feature map (N, C', h, w) instead of the pooled features.
        Through forward, so the encoder's input hooks (data.normalize) apply either way.
        """
        if feature_map:
            if self._feature_map is None:
                raise ValueError(f"{type(self._net).__name__} has no feature map to decode")
            if self._feature_map == FORWARD_FEATURES:
                return self._net.forward_features(x)
            return output_of(self._net, self._feature_map, x)
        if keep is None:
            return self._net(x)
        if self.patch_tokens is None:
            raise ValueError(f"{type(self._net).__name__} has no patch tokens to select")
        tokens = self.patch_tokens.embed(x)  # (N, L, D), position embedding added
        visible = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (N, K, D)
        return self.patch_tokens.encode(visible)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them.

        Memory for activations drops to about one block's, for roughly a third more compute.
        ptft checkpoints the blocks of torchvision networks itself, restoring batch norm's running
        statistics after each recomputation so they are updated once per step, as without it;
        timm networks checkpoint themselves.

        Raises:
            UserError: a timm network without support for it, or one with batch norm (timm's
                recomputation would update its running statistics twice per step); no blocks.
        """
        if self._blocks is None:
            self._library_grad_checkpointing(enable)
            return
        blocks = [block for path in self._blocks for block in self._net.get_submodule(path).children()]
        if not blocks:
            raise UserError("train.grad_checkpointing: this encoder has no blocks to checkpoint")
        for block in blocks:
            if enable:
                block.forward = types.MethodType(_checkpointed_forward, block)  # an instance's own forward
            else:
                block.__dict__.pop("forward", None)

    def _library_grad_checkpointing(self, enable: bool) -> None:
        name = type(self._net).__name__
        if enable and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules()):
            raise UserError(f"train.grad_checkpointing: timm's {name} has batch norm, whose running statistics "
                            "its recomputation would update twice per step; use a transformer or ConvNeXt, or "
                            "the torchvision: family of this architecture")
        try:
            self._net.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError, AttributeError):  # timm: `assert not enable, "... not supported"`
            raise UserError(f"train.grad_checkpointing: timm's {name} does not support gradient checkpointing; "
                            "set it to false") from None

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter, 0 for the stem, num_layers - 1 for the last norm.

        Raises:
            ValueError: the name is not one of this encoder's parameters.
        """
        if param_name not in self._layer_ids:
            raise ValueError(f"not a parameter of this encoder: {param_name!r}")
        return self._layer_ids[param_name]

    def upgrade_library_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys of older library files renamed to today's (the library does this when it loads them)."""
        for pattern, replacement in self._legacy_renames:
            state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
        return state

    def adapt_weight(self, param_name: str, tensor: torch.Tensor, model_shape: torch.Size) -> torch.Tensor | None:
        """A file's position embedding for another image size, resampled to this model's grid; else None."""
        if self._position_embedding is None or param_name != self._position_embedding[0]:
            return None
        _, prefix, grid = self._position_embedding
        return resample_position_embedding(tensor, prefix, grid, model_shape)

    def explain_mismatch(self, param_name: str, file_shape, model_shape) -> str | None:
        """The config fix for a stem conv whose kernel differs from the file's (see weights.match_into)."""
        if param_name != self.stem_weight or len(file_shape) != 4 or len(model_shape) != 4:
            return None
        if tuple(file_shape[2:]) == tuple(model_shape[2:]):
            return None
        return (f"The file's stem conv {param_name} has a {file_shape[2]}x{file_shape[3]} kernel, the model's "
                f"{model_shape[2]}x{model_shape[3]}: set model.small_input=false to build the library's stem")


class PatchTokens:
    """A ViT's forward in two steps, so a subset of its patches can be encoded (MAE).

    Subclasses hold the network and say how its library spells the steps:
    `embed(x)`: (N, C, H, W) -> (N, L, D) patch tokens with their position embedding, no class token;
    `encode(tokens)`: (N, K, D) -> (N, prefix + K, D) after the class token, the blocks and the norm.
    """

    patch_size: int
    num_patches: int
    width: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _checkpointed_forward(block: nn.Module, *args):
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *args)
    # Non-reentrant: works with frozen inputs and keyword arguments, and restores the RNG for dropout.
    return checkpoint(forward, block, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(block)))


@contextlib.contextmanager
def _running_stats_kept(block: nn.Module):
    """Batch norm's running statistics as they were before the recomputation of `block`'s forward.

    The recomputation runs the block in training mode again, on the same batch: without this
    each step would move the running mean and variance twice (and count two batches).
    """
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [[buffer.clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (mean, var, count) in zip(norms, saved):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(count)


def output_of(net: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """The output of `net`'s submodule `path` for the input `x`, running `net` only that far."""
    captured = []

    def stop(_module, _args, output):
        captured.append(output)
        raise _Reached  # what follows (pooling, classifier) is not needed

    handle = net.get_submodule(path).register_forward_hook(stop)
    try:
        net(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]


class _Reached(Exception):
    pass


def resample_position_embedding(tensor: torch.Tensor, prefix: int, grid: tuple[int, int],
                                model_shape: torch.Size) -> torch.Tensor | None:
    """(1, prefix + h*w, D) trained on an h x w patch grid -> (1, prefix + gh*gw, D), bicubic (as timm does).

    None when the file's embedding is not a square grid of the same width plus the same prefix tokens.
    """
    if tensor.dim() != 3 or len(model_shape) != 3 or tensor.shape[2] != model_shape[2] or tensor.shape[0] != 1:
        return None
    side = math.isqrt(tensor.shape[1] - prefix) if tensor.shape[1] > prefix else 0
    if side * side != tensor.shape[1] - prefix or prefix + grid[0] * grid[1] != model_shape[1]:
        return None
    tokens, patches = tensor[:, :prefix], tensor[:, prefix:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, D, side, side)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(tensor.dtype)
    return torch.cat([tokens, patches], dim=1)


def replace_module(net: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` of `net` (`features.0.0`, `fc`)."""
    parent_path, _, name = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, name, module)


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    """(path, module) of the network's first Conv2d: its stem."""
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return path, module
    raise ValueError(f"{type(net).__name__} has no Conv2d stem")


def conv_like(conv: nn.Conv2d, *, in_channels: int | None = None, kernel_size=None, stride=None,
              padding=None) -> nn.Conv2d:
    """A fresh Conv2d as `conv` with some of its settings changed."""
    return nn.Conv2d(in_channels or conv.in_channels, conv.out_channels,
                     kernel_size=kernel_size or conv.kernel_size, stride=stride or conv.stride,
                     padding=conv.padding if padding is None else padding, dilation=conv.dilation,
                     groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)


def check_layer_ids(net: nn.Module, layer_ids: dict[str, int]) -> dict[str, int]:
    """`layer_ids`, after checking that it covers every parameter and never goes back in depth."""
    names = [name for name, _ in net.named_parameters()]
    missing = [name for name in names if name not in layer_ids]
    if missing:
        raise ValueError(f"{type(net).__name__}: no depth for {missing[:3]}")
    depths = [layer_ids[name] for name in names]
    if depths != sorted(depths):
        raise ValueError(f"{type(net).__name__}: depths go back along the parameters")
    return layer_ids
