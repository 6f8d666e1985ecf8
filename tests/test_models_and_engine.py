"""The extractor, the indexing pipeline and the engine, in process, with
seeded random ResNet50 weights or small fakes."""

import numpy as np
import pytest

from conftest import make_dataset
from search_utils import engine, errors, models
from search_utils.errors import ImageReadError, ModelMismatchError, UnknownModelError
from search_utils.images import load_image
from search_utils.indexing import embed_images
from search_utils.store import FeatureStore
from test_images import keras_recipe


@pytest.fixture(scope="module")
def extractor(random_resnet50):
    return models.FeatureExtractor(models.get_model_spec("resnet50"), random_resnet50, "random")


class MeanColourExtractor:
    """A stand-in model: the mean colour of each image (3 features)."""

    spec = models.ModelSpec(name="mean_colour", build=None, preprocess=None, feature_dim=3, input_size=(8, 8))
    weights = "none"

    def __init__(self):
        self.batches = []

    def embed(self, batch):
        self.batches.append(len(batch))
        return batch.reshape(len(batch), -1, 3).mean(axis=1).astype(np.float32)


def test_extractor_gives_the_posts_features(tmp_path, extractor, random_resnet50):
    root = tmp_path / "ds"
    files = make_dataset(root)
    paths = [str(root / name) for name in files["good"][:3]]
    batch = np.stack([load_image(p) for p in paths])
    ours = extractor.embed(batch)
    assert ours.shape == (3, 2048) and ours.dtype == np.float32
    post = np.concatenate([random_resnet50.predict(keras_recipe(p), verbose=0) for p in paths[:2]])
    np.testing.assert_allclose(ours[:2], post, rtol=1e-4, atol=1e-5)


def test_embed_images_skips_bad_files_and_keeps_order(tmp_path):
    root = tmp_path / "ds"
    files = make_dataset(root)
    everything = sorted(files["good"] + files["bad"])
    paths = [str(root / name) for name in everything]
    fake, skipped, progress = MeanColourExtractor(), [], []
    result = embed_images(paths, fake, batch_size=3, on_progress=progress.append, on_skip=skipped.append)
    assert result.paths == [p for p in paths if any(p.endswith(g) for g in files["good"])]
    assert sorted(e.path for e in result.skipped) == sorted(str(root / b) for b in files["bad"])
    assert [e.path for e in skipped] == [e.path for e in result.skipped]
    assert sum(progress) == len(paths) and max(fake.batches) <= 3
    expected = np.stack([load_image(p, size=(8, 8)).reshape(-1, 3).mean(0) for p in result.paths])
    np.testing.assert_allclose(result.features, expected, rtol=1e-6)


def test_query_in_the_store_reuses_its_row_without_a_model(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not read")
    store = FeatureStore([str(tmp_path / "a.png")], np.ones((1, 3), np.float32), {})

    def no_model():
        raise AssertionError("the model must not be built for a stored query")

    vector, reused = engine.query_features(store, str(tmp_path / "." / "a.png"), MeanColourExtractor.spec, no_model)
    assert reused and vector.tolist() == [1.0, 1.0, 1.0]


def test_outside_query_is_read_first_then_embedded(tmp_path):
    from conftest import draw_picture

    draw_picture(3).save(tmp_path / "q.png")
    store = FeatureStore(["elsewhere.png"], np.ones((1, 3), np.float32), {})
    built = []

    def make():
        built.append(True)
        return MeanColourExtractor()

    vector, reused = engine.query_features(store, str(tmp_path / "q.png"), MeanColourExtractor.spec, make)
    assert not reused and built and vector.shape == (3,)
    (tmp_path / "bad.png").write_text("nope")
    built.clear()
    with pytest.raises(ImageReadError):
        engine.query_features(store, str(tmp_path / "bad.png"), MeanColourExtractor.spec, make)
    assert not built  # a bad query fails before the slow model build


def test_store_model_reads_metadata_or_assumes_the_post():
    post = FeatureStore(["a"], np.zeros((1, 2048), np.float32), {})
    found = engine.store_model(post)
    assert found.spec.name == "resnet50" and found.assumed and found.weights is None
    with pytest.raises(ModelMismatchError, match="100 values per image but the post's resnet50"):
        engine.store_model(FeatureStore(["a"], np.zeros((1, 100), np.float32), {}))
    tagged = FeatureStore(["a"], np.zeros((1, 2048), np.float32), {"model": "resnet50", "weights": "/w.h5"})
    assert engine.store_model(tagged).weights == "/w.h5"
    with pytest.raises(ModelMismatchError, match="made with resnet50, not efficientnetv2_b0"):
        engine.store_model(tagged, requested="efficientnetv2_b0")


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="known models: .*resnet50"):
        models.get_model_spec("vgg99")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(models.WeightsUnavailableError, match="weights file not found"):
        models.load_extractor(models.get_model_spec("resnet50"), str(tmp_path / "none.h5"))


def test_bf16_features_stay_within_about_one_percent(tmp_path, random_weights_file):
    root = tmp_path / "ds"
    files = make_dataset(root)
    batch = np.stack([load_image(str(root / name)) for name in files["good"]])
    spec = models.get_model_spec("resnet50")
    full = models.load_extractor(spec, str(random_weights_file), "float32").embed(batch)
    half = models.load_extractor(spec, str(random_weights_file), "bf16")
    assert half.precision == "bf16"
    fast = half.embed(batch)
    assert fast.dtype == np.float32
    assert np.abs(fast - full).sum() / np.abs(full).sum() < 0.01
    assert not np.array_equal(fast, full)  # it really computed in bfloat16


def test_bf16_is_refused_where_it_costs_accuracy():
    # Measured: EfficientNet-Lite0's features move by about 8% in bfloat16.
    assert not models.get_model_spec("efficientnet_lite0").bf16_ok
    assert models.get_model_spec("resnet50").bf16_ok


def test_bf16_falls_back_to_float32_without_cpu_support(tmp_path, monkeypatch, capsys, random_weights_file):
    import json

    import create_imagenet_features

    root = tmp_path / "ds"
    make_dataset(root)
    monkeypatch.setattr(create_imagenet_features, "bf16_supported", lambda: False)
    code = create_imagenet_features.main(["--dataset", str(root), "--output", str(tmp_path / "f.csv"),
                                          "--weights", str(random_weights_file), "--precision", "bf16", "-q"])
    assert code == 0
    assert "no AMX bfloat16 units" in capsys.readouterr().err
    assert json.loads((tmp_path / "f.csv.meta.json").read_text())["precision"] == "float32"


def test_search_embeds_queries_with_the_recorded_resize():
    meta = {"model": "resnet50", "preprocessing": {"resize": "bilinear"}}
    found = engine.store_model(FeatureStore(["a"], np.zeros((1, 2048), np.float32), meta))
    assert found.spec.resize == "bilinear"
    assert models.get_model_spec("resnet50").resize == "nearest"  # the registry is untouched


def test_resize_option_is_used_and_recorded(tmp_path):
    import json

    import create_imagenet_features

    root = tmp_path / "ds"
    make_dataset(root)
    assert create_imagenet_features.main(["--dataset", str(root), "--output", str(tmp_path / "f.csv"),
                                          "--model", "efficientnet_lite0", "--resize", "bicubic", "-q"]) == 0
    assert json.loads((tmp_path / "f.csv.meta.json").read_text())["preprocessing"]["resize"] == "bicubic"


def test_openvino_runtime_gives_the_tensorflow_features(dataset):
    """--runtime openvino runs the same model, converted: same features."""
    from search_utils.images import load_images

    root, names = dataset
    spec = models.get_model_spec("efficientnet_lite0")
    _, arrays, _ = load_images([str(root / n) for n in names["good"]], size=spec.input_size,
                               interpolation=spec.resize)
    batch = np.stack(arrays)
    reference = models.load_extractor(spec).embed(batch)
    converted = models.load_extractor(spec, runtime="openvino")
    assert converted.runtime == "openvino"
    features = converted.embed(batch)
    assert features.shape == reference.shape
    assert np.abs(features - reference).sum() / np.abs(reference).sum() < 1e-4


def test_runtime_is_recorded_and_a_missing_openvino_is_one_line(tmp_path, dataset, monkeypatch):
    import builtins
    import json

    import create_imagenet_features

    root, _ = dataset
    args = ["--dataset", str(root), "--model", "efficientnet_lite0", "--runtime", "openvino", "-q"]
    assert create_imagenet_features.main(args + ["--output", str(tmp_path / "f.csv")]) == 0
    assert json.loads((tmp_path / "f.csv.meta.json").read_text())["runtime"] == "openvino"

    real_import = builtins.__import__

    def no_openvino(name, *rest, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *rest, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(errors.RuntimeUnavailableError, match="pip install openvino"):
        create_imagenet_features.main(args + ["--output", str(tmp_path / "g.csv")])
    assert not (tmp_path / "g.csv").exists()
