import os

import numpy as np
import pytest
from PIL import Image

from conftest import draw_picture, transparent_icon
from search_utils.errors import DatasetError, ImageReadError
from search_utils.images import find_images, load_image
from search_utils.models import get_model_spec


def keras_recipe(path):
    """The post's preprocessing, verbatim."""
    from keras.applications.resnet50 import preprocess_input
    from keras.utils import img_to_array, load_img

    img = load_img(path, target_size=(224, 224))
    return preprocess_input(np.expand_dims(img_to_array(img), axis=0))


@pytest.mark.parametrize(
    "name, make",
    [
        ("photo.jpg", lambda: draw_picture(1, size=(300, 200))),
        ("grey.png", lambda: draw_picture(2, mode="L")),
        ("palette.gif", lambda: draw_picture(3).convert("P")),
        ("opaque_rgba.png", lambda: draw_picture(4, mode="RGBA")),
        ("already224.bmp", lambda: draw_picture(5, size=(224, 224))),
    ],
)
def test_opaque_images_give_exactly_the_posts_preprocessing(tmp_path, name, make):
    path = str(tmp_path / name)
    make().save(path)
    spec = get_model_spec("resnet50")
    ours = spec.preprocess(load_image(path)[np.newaxis])
    assert ours.dtype == np.float32
    assert np.array_equal(ours, keras_recipe(path))


def test_transparency_is_composited_on_white(tmp_path):
    path = str(tmp_path / "icon.png")
    transparent_icon(hidden=(0, 255, 0)).save(path)
    pixels = load_image(path, size=(64, 64))
    assert pixels[0, 0].tolist() == [255, 255, 255]  # not the hidden green
    assert pixels[32, 32].tolist() == [0, 0, 255]
    # The post's recipe exposes the hidden colour instead.
    from keras.utils import img_to_array, load_img

    assert img_to_array(load_img(path))[0, 0].tolist() == [0, 255, 0]


def test_half_transparent_pixels_blend_with_white(tmp_path):
    path = str(tmp_path / "la.png")
    Image.new("LA", (8, 8), (0, 128)).save(path)  # black at ~50% opacity
    value = load_image(path, size=(8, 8))[0, 0]
    assert all(120 <= v <= 135 for v in value)


def test_palette_transparency_is_composited(tmp_path):
    path = str(tmp_path / "palette.png")
    img = transparent_icon(hidden=(0, 255, 0)).convert("RGB").convert("P")
    green = img.getpixel((0, 0))
    img.save(path, transparency=green)
    pixels = load_image(path, size=(64, 64))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[32, 32].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied(tmp_path):
    path = str(tmp_path / "rotated.jpg")
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 100, 100))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(path, exif=exif, quality=95)
    upright = load_image(path, size=(200, 100))  # (height, width) as displayed
    assert upright[20, 50].mean() < 30  # top half black after rotation
    assert upright[180, 50].mean() > 225


def test_animated_gif_uses_the_first_frame(tmp_path):
    path = str(tmp_path / "anim.gif")
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(path, size=(32, 32))[5, 5].tolist() == [255, 0, 0]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = str(tmp_path / "deep.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(path)
    assert 120 <= load_image(path, size=(16, 16))[0, 0, 0] <= 135


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello"), "not an image"),
        (lambda p: p.write_bytes(_jpeg_bytes()[:400]), "truncated"),
        (lambda p: None, "file not found"),
        (lambda p: p.symlink_to(p.parent / "gone.jpg"), "broken symbolic link"),
    ],
)
def test_unreadable_files_say_why(tmp_path, setup, reason):
    path = tmp_path / "bad.jpg"
    setup(path)
    with pytest.raises(ImageReadError, match=reason) as caught:
        load_image(str(path))
    assert str(path) in str(caught.value)


def _jpeg_bytes():
    import io

    buffer = io.BytesIO()
    draw_picture(0, size=(300, 300)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_decompression_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.png")
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)
    with pytest.raises(ImageReadError, match="decompression-bomb"):
        load_image(path)


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b.JPG", "a.png", "sub/c.Jpeg", "sub/deeper/d.webp", "notes.txt", "e.tiff", "sub/z.gif"]:
        target = tmp_path / "ds" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    (tmp_path / "ds" / "loop").symlink_to(tmp_path / "ds")  # must not be followed
    found = find_images(str(tmp_path / "ds"))
    rel = [os.path.relpath(p, tmp_path / "ds") for p in found]
    assert rel == ["a.png", "b.JPG", "e.tiff", "sub/c.Jpeg", "sub/deeper/d.webp", "sub/z.gif"]
    assert found[0] == os.path.join(str(tmp_path / "ds"), "a.png")


def test_find_images_refuses_missing_folder_and_file(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        find_images(str(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        find_images(str(tmp_path / "file.png"))
