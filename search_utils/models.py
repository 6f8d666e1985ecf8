"""The registry of backbones and the batched feature extractor.

A model is one `ModelSpec` entry: its name, how to build it, its input size,
resize filter and pixel preprocessing, its feature dimension and where its
weights come from. Everything else (indexing, search) only talks to a
`FeatureExtractor`, so adding a backbone is one more entry, not a new code
path. Nothing here is built or imported from TensorFlow until asked.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from .errors import (
    RuntimeUnavailableError, SearchUtilsError, UnknownModelError, WeightsUnavailableError, printable_path,
)

# The engine compiles the model with tf.function: pin Keras to TensorFlow
# before anything imports it (a user's KERAS_BACKEND still wins).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

Features = npt.NDArray[np.float32]  # (n, feature_dim)
Batch = npt.NDArray[np.uint8]  # (n, height, width, 3), RGB 0..255

IMAGENET = "imagenet"  # weights downloaded by Keras on first use
PACKAGED = "packaged"  # weights installed by pip with a Python package


@dataclass(frozen=True)
class ModelSpec:
    """One backbone: everything needed to embed an image and to say how.

    Attributes:
        name: registry key, recorded in the features file's metadata.
        build: `build(weights) -> keras.Model` mapping a preprocessed float32
            batch to (n, feature_dim) features; `weights` is IMAGENET, a local
            file path, or None for random initialisation.
        preprocess: numpy function from a uint8 RGB batch to model input;
            must not modify its argument.
        feature_dim: length of one feature vector.
        input_size: (height, width) the images are resized to.
        resize: Pillow filter name used for that resize.
        preprocessing: human-readable description, stored in metadata.
        default_weights: what to load when the user gives no --weights.
        bf16_ok: whether --precision bf16 is allowed (features measured
            within about 1% of float32).
    """

    name: str
    build: Callable[[Any], Any]
    preprocess: Callable[[Batch], np.ndarray]
    feature_dim: int
    input_size: tuple[int, int] = (224, 224)
    resize: str = "nearest"
    preprocessing: str = ""
    default_weights: str = IMAGENET
    bf16_ok: bool = False  # measured: bfloat16 features within about 1% of float32

    def describe_preprocessing(self) -> dict:
        """The preprocessing as recorded in a features file's metadata."""
        return {
            "input_size": list(self.input_size),
            "resize": self.resize,
            "alpha": "composited on white",
            "exif_orientation": "applied",
            "animation": "first frame",
            "pixels": self.preprocessing,
        }


def _resnet50(weights: Any):
    import keras

    return keras.applications.ResNet50(
        weights=weights, include_top=False, pooling="avg"
    )


def _resnet50_preprocess(batch: Batch) -> np.ndarray:
    from keras.applications.resnet50 import preprocess_input

    # astype copies: Keras' preprocess_input works in place on float arrays.
    return preprocess_input(batch.astype(np.float32))


def _efficientnet_lite0(weights: Any):
    from .efficientnet_lite import build_efficientnet_lite0

    return build_efficientnet_lite0(weights=weights)


def _efficientnet_lite0_preprocess(batch: Batch) -> np.ndarray:
    from .efficientnet_lite import preprocess

    return preprocess(batch)


def _efficientnetv2_b0(weights: Any):
    import keras

    return keras.applications.EfficientNetV2B0(
        weights=weights, include_top=False, pooling="avg",
        include_preprocessing=True,
    )


def _identity_float(batch: Batch) -> np.ndarray:
    # EfficientNetV2 rescales 0..255 inside the network.
    return batch.astype(np.float32)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="resnet50",
            build=_resnet50,
            preprocess=_resnet50_preprocess,
            feature_dim=2048,
            preprocessing="keras.applications.resnet50.preprocess_input (caffe: RGB->BGR, ImageNet mean subtracted)",
            bf16_ok=True,  # 0.3% (bench/bench_indexing.py)
        ),
        ModelSpec(
            name="efficientnet_lite0",
            build=_efficientnet_lite0,
            preprocess=_efficientnet_lite0_preprocess,
            feature_dim=1280,
            resize="bilinear",
            preprocessing="(x - 127) / 128 on RGB 0..255",
            default_weights=PACKAGED,
        ),
        ModelSpec(
            name="efficientnetv2_b0",
            build=_efficientnetv2_b0,
            preprocess=_identity_float,
            feature_dim=1280,
            resize="bilinear",
            preprocessing="RGB 0..255; the network rescales to -1..1 itself",
        ),
    )
}
DEFAULT_MODEL = "resnet50"


def get_model_spec(name: str) -> ModelSpec:
    """Look a model up by name.

    Raises:
        UnknownModelError: no such model; the message lists the known ones.
    """
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {known}"
        ) from None


class FeatureExtractor:
    """Embeds batches of RGB images with one model, through a compiled call.

    One `tf.function` traced once for any batch size replaces Keras'
    per-call `model.predict` machinery, which costs about half the speed on
    small batches.
    """

    def __init__(self, spec: ModelSpec, model: Any, weights: str):
        import tensorflow as tf

        self.spec = spec
        self.model = model
        self.weights = weights  # IMAGENET, "random", or an absolute file path
        self.precision = "float32"
        self.runtime = "tensorflow"
        height, width = spec.input_size
        signature = [tf.TensorSpec((None, height, width, 3), tf.float32)]
        self._call = tf.function(
            lambda x: model(x, training=False), input_signature=signature,
            autograph=False,  # nothing to convert; autograph would leave its source in /tmp
        )

    def embed(self, batch: Batch) -> Features:
        """Features of a uint8 RGB batch of shape (n, height, width, 3)."""
        if len(batch) == 0:
            return np.zeros((0, self.spec.feature_dim), np.float32)
        inputs = self.spec.preprocess(np.asarray(batch))
        return np.asarray(self._call(inputs), dtype=np.float32)


class OpenVinoExtractor(FeatureExtractor):
    """The same model, run by OpenVINO instead of TensorFlow.

    OpenVINO converts the Keras model as built (weights included) and
    compiles it for this CPU; with its latency hint one call uses every
    core. Measured on the 2-core test machine: ResNet50 41 images/s against
    29 through the compiled TensorFlow call, features equal to 1e-6
    (docs/PERFORMANCE.md).
    """

    def __init__(self, spec: ModelSpec, model: Any, weights: str, precision: str = "float32"):
        super().__init__(spec, model, weights)
        try:
            import openvino
        except ImportError:
            raise RuntimeUnavailableError(
                "the openvino runtime is not installed: pip install openvino, or use --runtime tensorflow"
            ) from None
        height, width = spec.input_size
        with warnings.catch_warnings():  # Keras on the converter's tracing call: harmless
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            converted = openvino.convert_model(model, input=[(-1, height, width, 3)])
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self._compiled = openvino.Core().compile_model(converted, "CPU", config)
        self.runtime = "openvino"

    def embed(self, batch: Batch) -> Features:
        if len(batch) == 0:
            return np.zeros((0, self.spec.feature_dim), np.float32)
        inputs = np.ascontiguousarray(self.spec.preprocess(np.asarray(batch)), dtype=np.float32)
        return np.asarray(self._compiled(inputs)[0], dtype=np.float32)


PRECISIONS = ("float32", "bf16")
RUNTIMES = ("tensorflow", "openvino")


def bf16_supported() -> bool:
    """Whether bf16 pays off on this CPU: it needs AMX's bfloat16 tile
    units. With only AVX512-BF16, ResNet50 measured slower in bf16 than in
    float32 (15 vs 26 images/s, docs/PERFORMANCE.md)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read().split()
    except OSError:
        return False
    return "amx_bf16" in flags


def load_extractor(spec: ModelSpec, weights: str | None = None, precision: str = "float32",
                   runtime: str = "tensorflow", hold_native_logs: bool = True) -> FeatureExtractor:
    """Build `spec`'s model with its weights and wrap it for embedding.

    Args:
        weights: a local weights file, or None for the model's default
            (for Keras applications, the ImageNet download).
        precision: "float32" (features identical to the post's) or "bf16"
            (Keras' mixed_bfloat16 policy: faster on CPUs with bfloat16
            instructions, features within about 1%). Check `bf16_supported`
            first; this function does as it is told.
        runtime: "tensorflow" or "openvino" (the same model converted;
            faster on CPUs, features equal to about 1e-6).
        hold_native_logs: hold back TensorFlow's start-up lines (see
            native_logs_held_back). False for a caller that holds them
            itself, or whose other threads log meanwhile (the service):
            fd 2 is the whole process's, and their lines would be lost.

    Raises:
        WeightsUnavailableError: the weights file is missing or unreadable,
            or the download failed (message names the file and the cache).
        RuntimeUnavailableError: openvino asked for but not installed.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if weights is not None and not os.path.isfile(weights):
        shown = printable_path(weights)
        if os.path.isdir(weights):
            raise WeightsUnavailableError(f"weights file {shown} is a folder, not a weights file")
        if os.path.exists(weights):
            raise WeightsUnavailableError(f"weights file {shown} is not a regular file (a FIFO, socket or device)")
        raise WeightsUnavailableError(f"weights file not found: {shown}")
    source = spec.default_weights if weights is None else weights
    held = native_logs_held_back() if hold_native_logs else contextlib.nullcontext()
    with held, _dtype_policy("mixed_bfloat16" if precision == "bf16" else "float32"):
        try:
            model = spec.build(source)
        except WeightsUnavailableError:
            raise
        except Exception as error:  # Keras raises bare Exceptions here.
            raise _weights_error(spec, source, error) from error
        named = source if weights is None else os.path.abspath(weights)
        if runtime == "openvino":
            extractor = OpenVinoExtractor(spec, model, named, precision)
        else:
            extractor = FeatureExtractor(spec, model, named)
    extractor.precision = precision
    return extractor


@contextlib.contextmanager
def _dtype_policy(name: str):
    """Build models under Keras' dtype policy `name`, then put it back."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@contextlib.contextmanager
def native_logs_held_back():
    """Hold back what TensorFlow's C++ side writes to file descriptor 2 while
    it starts (CPU features, CUDA probes: its log level doesn't apply that
    early, not even TF_CPP_MIN_LOG_LEVEL=3); replay it only if starting
    fails, where it may explain why. An interrupt (Ctrl-C, SIGTERM) is no
    such failure: its one line is all the user sees."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            # Keras prints download progress to stdout, which is for results.
            with contextlib.redirect_stdout(sys.stderr):
                yield
        except (SearchUtilsError, KeyboardInterrupt):
            raise  # its message says it all
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def keras_cache_dir() -> str:
    """Folder where Keras caches downloaded application weights."""
    from keras.src.backend import config

    return os.path.join(os.path.expanduser(config.keras_home()), "models")


def _weights_error(spec: ModelSpec, source: Any, error: Exception) -> WeightsUnavailableError:
    text = " ".join(str(error).split())
    if source == IMAGENET:
        match = re.search(r"URL fetch failure on (\S+?): (?:\S+ -- )?(.*)", text)
        wanted = os.path.basename(match.group(1)) if match else "its weights file"
        reason = match.group(2) if match else text[:200]
        return WeightsUnavailableError(
            f"could not download the ImageNet weights of {spec.name} ({reason}); "
            f"Keras wants the file {wanted} in {keras_cache_dir()}: copy it there, "
            f"or pass a local weights file with --weights PATH"
        )
    return WeightsUnavailableError(
        f"could not load weights for {spec.name} from {source}: {text[:200]}"
    )
