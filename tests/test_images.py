import os

import numpy as np
import pytest
from PIL import Image

from conftest import draw_picture, transparent_icon
from search_utils.errors import DatasetError, ImageReadError
from search_utils.images import MAX_JPEG_PIXELS_PER_BYTE, find_images, load_image
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
    (tmp_path / "ds" / "loop").symlink_to(tmp_path / "ds")  # a loop: followed, but adds nothing
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


def test_find_images_refuses_a_path_through_a_file(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="a part of its path is a file"):
        find_images(str(tmp_path / "file.png" / "photos"))


# ---------------------------------------------------------------- which files are listed


def _touch_all(root, rels):
    for rel in rels:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")


def _listed(root, **options):
    return [os.path.relpath(p, root) for p in find_images(str(root), **options)]


def test_hidden_files_and_folders_are_left_out_unless_asked_for(tmp_path):
    root = tmp_path / "photos"
    _touch_all(root, ["a.jpg", "trip/b.jpg", "trip/.thumbnails/b.jpg", ".git/objects/c.png", "._a.jpg",
                      "trip/.hidden.png", "trip/normal.name.with.dots.png"])
    assert _listed(root) == ["a.jpg", "trip/b.jpg", "trip/normal.name.with.dots.png"]
    assert _listed(root, include_hidden=True) == [
        "._a.jpg", ".git/objects/c.png", "a.jpg", "trip/.hidden.png", "trip/.thumbnails/b.jpg", "trip/b.jpg",
        "trip/normal.name.with.dots.png"]


def test_a_hidden_dataset_folder_itself_is_listed(tmp_path):
    root = tmp_path / ".photos"
    _touch_all(root, ["a.jpg", ".cache/a.jpg"])
    assert find_images(str(root)) == [os.path.join(str(root), "a.jpg")]


def test_symlinked_folders_are_followed_once_each(tmp_path):
    root, outside = tmp_path / "library", tmp_path / "elsewhere"
    _touch_all(root, ["own/a.jpg", "own/deeper/b.png"])
    _touch_all(outside, ["holiday/c.jpg", "holiday/sub/d.jpg"])
    (root / "holiday").symlink_to(outside / "holiday")  # a photo folder linked in from outside
    (root / "also_holiday").symlink_to(outside / "holiday")  # the same folder again
    (root / "alias_of_own").symlink_to(root / "own")  # a folder that is listed anyway
    (root / "own" / "deeper" / "up").symlink_to(root)  # a loop back to the top
    (outside / "holiday" / "sub" / "back").symlink_to(outside / "holiday")  # a loop inside the linked folder
    (root / ".hidden_link").symlink_to(outside / "holiday")  # hidden: not followed
    listed = _listed(root)
    # Each real folder once: the dataset's own folders by their own path,
    # the linked one by the first link found (in name order).
    assert listed == ["also_holiday/c.jpg", "also_holiday/sub/d.jpg", "own/a.jpg", "own/deeper/b.png"]


def test_a_symlinked_folder_inside_a_linked_folder_is_followed(tmp_path):
    root, outside, further = tmp_path / "library", tmp_path / "elsewhere", tmp_path / "further"
    _touch_all(root, ["a.jpg"])
    _touch_all(outside, ["b.jpg"])
    _touch_all(further, ["c.jpg"])
    (root / "linked").symlink_to(outside)
    (outside / "chained").symlink_to(further)
    assert _listed(root) == ["a.jpg", "linked/b.jpg", "linked/chained/c.jpg"]


def test_broken_and_looping_links_are_listed_only_with_image_names(tmp_path):
    root = tmp_path / "library"
    _touch_all(root, ["a.jpg"])
    (root / "gone_folder").symlink_to(tmp_path / "missing")  # a broken link, no image name: nothing to list
    (root / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # listed; reading it says why it fails
    (root / "self_loop").symlink_to("self_loop")
    assert _listed(root) == ["a.jpg", "gone.jpg"]


# ---------------------------------------------------------------- big JPEGs and the bomb limit


@pytest.fixture(scope="module")
def camera_jpeg(tmp_path_factory):
    """A real JPEG of 12000x8500 pixels (102 megapixels, over Pillow's
    decompression-bomb limit of 89.5), like a medium-format camera's: a
    small picture scaled up, saved at low quality so the file stays small.
    Made at test time, never committed."""
    path = tmp_path_factory.mktemp("camera") / "camera.jpg"
    small = draw_picture(21, size=(120, 85))
    small.resize((12000, 8500), Image.Resampling.BILINEAR).save(path, quality=40)
    assert path.stat().st_size < 8_000_000
    return path, small


def _recording_loads(monkeypatch):
    from PIL import ImageFile

    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    return decoded


def test_a_camera_jpeg_over_the_bomb_limit_is_decoded_reduced(camera_jpeg, monkeypatch, recwarn):
    path, small = camera_jpeg
    assert 12000 * 8500 > Image.MAX_IMAGE_PIXELS
    decoded = _recording_loads(monkeypatch)
    pixels = load_image(str(path), size=(224, 224), interpolation="bilinear")
    assert set(decoded) == {(1500, 1063)}  # libjpeg at 1/8 scale: 1.6 megapixels, not 102
    assert len(recwarn) == 0  # no DecompressionBombWarning printed either
    expected = np.asarray(small.resize((224, 224), Image.Resampling.BILINEAR), dtype=int)
    assert np.abs(pixels.astype(int) - expected).mean() < 8  # it is the picture


def test_a_camera_jpeg_over_twice_the_limit_is_decoded_reduced_too(camera_jpeg, monkeypatch):
    path, _ = camera_jpeg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12000 * 8500 // 3)  # Pillow's error range, not its warning's
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert load_image(str(path)).shape == (224, 224, 3)


def test_a_jpeg_over_the_limit_even_reduced_is_refused_without_decoding(camera_jpeg, monkeypatch):
    path, _ = camera_jpeg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500 * 1063 - 1)  # 1/8 scale is one pixel too many
    decoded = _recording_loads(monkeypatch)
    with pytest.raises(ImageReadError, match="decompression-bomb limit even decoded reduced"):
        load_image(str(path))
    assert decoded == []


def test_a_progressive_jpeg_over_the_limit_is_refused_without_decoding(tmp_path, monkeypatch):
    """libjpeg holds a progressive JPEG's whole coefficients whatever the
    scale: decoding it reduced saves no memory, so the limit stays."""
    small = draw_picture(22, size=(120, 90))
    small.resize((3000, 2250)).save(tmp_path / "progressive.jpg", quality=50, progressive=True)
    small.resize((3000, 2250)).save(tmp_path / "baseline.jpg", quality=50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # 3000x2250 is over; 1/8 scale (375x282) is not
    decoded = _recording_loads(monkeypatch)
    with pytest.raises(ImageReadError, match="decompression-bomb limit.*can't be decoded reduced"):
        load_image(str(tmp_path / "progressive.jpg"), size=(16, 16))
    assert decoded == []
    assert load_image(str(tmp_path / "baseline.jpg"), size=(16, 16)).shape == (16, 16, 3)
    assert set(decoded) == {(375, 282)}


def _with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its start-of-frame header claiming width x height."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1): then height, width
    return jpeg[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 4:]


@pytest.mark.parametrize("width, height", [(65500, 65500), (4000, 3000)], ids=["over-the-limit", "under-it"])
def test_a_jpeg_claiming_more_pixels_than_its_bytes_hold_is_refused(tmp_path, monkeypatch, width, height):
    """A 700-byte JPEG whose header was edited to claim 65500x65500 would
    decode at 1/8 scale to 8187x8187 (260 MB, under the bomb limit) of
    invented pixels: refused unread, as is a smaller forged header."""
    small = tmp_path / "small.jpg"
    draw_picture(24, size=(64, 64)).save(small, quality=50)
    forged = tmp_path / "forged.jpg"
    forged.write_bytes(_with_frame_size(small.read_bytes(), width, height))
    decoded = _recording_loads(monkeypatch)
    with pytest.raises(ImageReadError, match=f"damaged JPEG: its header claims {width}x{height} pixels, far more "
                                             f"than its {forged.stat().st_size} bytes can hold"):
        load_image(str(forged))
    assert decoded == []
    assert load_image(str(small)).shape == (224, 224, 3)  # the file it was made from is fine


def test_a_flat_jpeg_holds_fewer_pixels_per_byte_than_the_plausibility_limit(tmp_path):
    """The densest real JPEG (one grey, Huffman tables optimised) is far
    under MAX_JPEG_PIXELS_PER_BYTE, so no real photo is refused by it."""
    path = tmp_path / "flat.jpg"
    Image.new("L", (4000, 3000), 128).save(path, quality=10, optimize=True)
    assert 4000 * 3000 / path.stat().st_size < MAX_JPEG_PIXELS_PER_BYTE / 3
    assert load_image(str(path), size=(16, 16)).shape == (16, 16, 3)


def test_a_png_over_the_limit_is_still_refused(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    draw_picture(23, size=(3000, 2250)).save(path, compress_level=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    decoded = _recording_loads(monkeypatch)
    with pytest.raises(ImageReadError, match="decompression-bomb limit\\); skipped without decoding"):
        load_image(str(path), size=(16, 16))
    assert decoded == []


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _jpeg_header(frame_marker: int, frame_components: int, scan_components: int) -> bytes:
    frame = bytes([8, 0x21, 0x34, 0x2E, 0xE0, frame_components]) + b"\x01\x11\x00" * frame_components
    scan = bytes([scan_components]) + b"\x01\x00" * scan_components + b"\x00\x3f\x00"
    return (b"\xff\xd8" + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
            + _segment(0xDB, bytes(65)) + b"\xff\xff" + _segment(frame_marker, frame)
            + _segment(0xC4, bytes(17)) + _segment(0xDA, scan))


@pytest.mark.parametrize(
    "header, reduced",
    [
        (_jpeg_header(0xC0, 3, 3), True),  # baseline, one interleaved scan: what cameras write
        (_jpeg_header(0xC1, 1, 1), True),  # extended sequential, greyscale
        (_jpeg_header(0xC0, 3, 1), False),  # baseline, one scan per colour: coefficients buffered
        (_jpeg_header(0xC2, 3, 3), False),  # progressive
        (_jpeg_header(0xC3, 3, 3), False),  # lossless
        (b"\xff\xd8\xff\xd9", False),  # no frame at all
        (_jpeg_header(0xC0, 3, 3)[:40], False),  # cut off before its scan
        (b"\xff\xd8junk", False),
    ],
)
def test_which_jpegs_decode_reduced_in_rows(header, reduced):
    """The header test behind the JPEG exception to the bomb limit, on the
    markers themselves (Pillow can't write a JPEG with one scan per colour)."""
    import io

    from search_utils.images import _jpeg_decodes_reduced_in_rows

    assert _jpeg_decodes_reduced_in_rows(io.BytesIO(header)) is reduced


def test_a_large_mpo_camera_file_is_decoded_reduced(tmp_path, monkeypatch):
    """Many cameras write MPO (a JPEG followed by more pictures): it is
    decoded reduced like a JPEG, first picture only."""
    from search_utils import images

    path = tmp_path / "camera.jpg"
    first, second = draw_picture(24, size=(1800, 1200)), draw_picture(25, size=(1800, 1200))
    first.save(path, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(path).format == "MPO"
    monkeypatch.setattr(images, "LARGE_IMAGE_PIXELS", 1000 * 1000)
    decoded = _recording_loads(monkeypatch)
    pixels = load_image(str(path), size=(100, 100))
    assert set(decoded) == {(900, 600)}  # 1/2 scale: 1/4 would keep under 4 x 100 pixels on the shorter side
    expected = np.asarray(first.resize((100, 100), Image.Resampling.NEAREST), dtype=int)
    assert np.abs(pixels.astype(int) - expected).mean() < 8


def test_a_camera_jpeg_is_indexed_and_found_through_the_real_commands(camera_jpeg, tmp_path):
    import json
    import shutil

    from conftest import run_command

    path, _ = camera_jpeg
    (tmp_path / "photos").mkdir()
    shutil.copy(path, tmp_path / "photos" / "camera.jpg")
    for seed in (1, 2):
        draw_picture(seed).save(tmp_path / "photos" / f"other{seed}.jpg")
    indexed = run_command("create_imagenet_features.py", "--dataset", "photos", "--output", "f.csv",
                          "--model", "efficientnet_lite0", "--quiet", cwd=tmp_path)
    assert indexed.returncode == 0, indexed.stderr
    assert "skipping" not in indexed.stderr and "(0 skipped)" in indexed.stderr
    shutil.copy(path, tmp_path / "query.jpg")  # an outside query: embedded, not looked up
    searched = run_command("imagenet_search.py", "--query", "query.jpg", "--featuresPath", "f.csv", "--json",
                           "--no-plot", "--metric", "cosine", cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr
    top = json.loads(searched.stdout)["results"][0]
    assert os.path.realpath(os.path.join(tmp_path, top["path"])) == os.path.realpath(tmp_path / "photos" / "camera.jpg")
    assert top["distance"] < 1e-4
