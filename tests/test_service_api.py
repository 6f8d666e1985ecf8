"""The search service in process (FastAPI's TestClient): every endpoint and
every error status, with real files: a real collection indexed by the real
command, the real model for uploads (efficientnet_lite0, from pip), real
PNG/JPEG/MPO/GIF/WebP/BMP/TIFF files, a real decompression bomb, a real
truncated JPEG, a real EPS. Only the tests of the model's limits use a fake
extractor, one that blocks on an Event the test releases.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, draw_picture, run_command
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from served import ICONS

from search_utils.errors import WeightsUnavailableError
from search_utils.modes import MODES
from search_utils.service import MULTIPART_OVERHEAD, ServiceConfig, create_app

with warnings.catch_warnings():  # starlette's note about httpx versions, not about this code
    warnings.filterwarnings("ignore", message="Using `httpx` with")
    from fastapi.testclient import TestClient

COUNT = 40  # demo icons in the collection
SECRET = b"SECRET-OUTSIDE-THE-COLLECTION-7f3a"  # in a file outside the indexed folder
PATIENCE = 120  # seconds any bounded wait may take on a loaded machine (never a timing assertion)
ROUTES = {"/api/search": {"get", "post"}, "/api/images/{id}": {"get"}, "/api/thumbnails/{id}": {"get"},
          "/api/sample": {"get"}, "/api/health": {"get"}, "/api/stats": {"get"}}
FORMAT_FILES = {"photo.jpg": "image/jpeg", "drawing.gif": "image/gif", "drawing.webp": "image/webp",
                "drawing.bmp": "image/bmp", "drawing.tif": "image/tiff", "camera.jpg": "image/jpeg"}


# -- the collection, indexed once ------------------------------------------------


@dataclass
class Collection:
    folder: Path
    features: Path
    ids: dict[str, int]  # file name in icons/ -> row id

    def file(self, name: str) -> Path:
        return self.folder / "icons" / name


def index_collection(folder: Path) -> Path:
    """As served.index_icons (the first COUNT demo icons, indexed by the real
    command with efficientnet_lite0), plus what the tests of the service need
    in the same single indexing run: a byte-identical copy (to show `copies`),
    a 640x480 JPEG (thumbnails shrink it), one file of each other served
    format, and a camera-style multi-picture JPEG (MPO)."""
    icons = folder / "icons"
    icons.mkdir(parents=True)
    for icon in ICONS[:COUNT]:
        shutil.copy(icon, icons / icon.name)
    shutil.copy(ICONS[0], icons / "copy-of-first.png")
    photo = draw_picture(1, size=(640, 480))
    photo.save(icons / "photo.jpg", quality=90)
    photo.save(icons / "camera.jpg", format="MPO", save_all=True, append_images=[draw_picture(2, size=(640, 480))])
    for seed, name in enumerate(("drawing.gif", "drawing.webp", "drawing.bmp", "drawing.tif"), start=3):
        draw_picture(seed).save(icons / name)
    result = run_command("create_imagenet_features.py", "--dataset", "icons", "--output", "features.csv",
                         "--model", "efficientnet_lite0", "-q", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "features.csv"


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Collection:
    folder = tmp_path_factory.mktemp("service_api")
    features = index_collection(folder)
    outside = folder / "outside"
    outside.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("note", SECRET.decode())
    draw_picture(99, size=(300, 300)).save(outside / "secret.png", pnginfo=info)
    assert SECRET in (outside / "secret.png").read_bytes()
    app = create_app(ServiceConfig(str(features), load_model=False), log=lambda line: None)
    with TestClient(app) as client:
        sample = client.get("/api/sample", params={"n": 100}).json()
    ids = {os.path.basename(item["path"]): item["id"] for item in sample}
    assert len(ids) == COUNT + 7
    return Collection(folder, features, ids)


@pytest.fixture(scope="module")
def real_app(collection):
    logged: list[str] = []
    app = create_app(ServiceConfig(str(collection.features), load_model=True), log=logged.append)
    app.state.logged = logged
    return app


@pytest.fixture(scope="module")
def client(real_app):
    """The service with the real model, warm (the lifespan builds it)."""
    with TestClient(real_app) as client:
        deadline = time.monotonic() + PATIENCE
        while (state := client.get("/api/health").json()["model"]) != "ready":
            assert not state.startswith("unavailable"), state
            assert time.monotonic() < deadline, f"the model did not load: {state}"
            time.sleep(0.1)
        yield client
    assert not os.path.exists(real_app.state.uploads)  # removed at shutdown


# -- helpers ----------------------------------------------------------------------


def assert_secure(response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "object-src 'none'", "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert response.headers["x-frame-options"] == "DENY"


def assert_error(response, status: int, *fragments: str) -> dict:
    """A JSON error {"error": one line, "status": status}, with the security headers."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body
    for fragment in fragments:
        assert fragment in body["error"], body
    assert_secure(response)
    return body


def upload(client, app, content, name: str = "query.png", mime: str = "image/png", **params):
    """POST /api/search with `content` as the field `image`; the app's upload
    folder must be empty afterwards, whatever the answer."""
    response = client.post("/api/search", params=params, files={"image": (name, content, mime)})
    assert os.listdir(app.state.uploads) == []
    return response


def png_bytes(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 15000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (all black), written row by
    row: its header declares more pixels than Pillow's decompression-bomb
    limit allows, yet the file is about 30 kB."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_with(chunk: bytes, before: bytes = b"IDAT") -> bytes:
    """A real small PNG with `chunk` (whole, as png_chunk makes it) inserted before its first `before` chunk."""
    png = png_bytes(draw_picture(9, size=(32, 32)))
    at = png.index(before) - 4
    return png[:at] + chunk + png[at:]


def saved(picture: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    picture.save(out, kind)
    return out.getvalue()


def search_ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


# -- the page, static files, health, stats, openapi ----------------------------


def test_page_and_static_files_carry_the_security_headers(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text and "/static/app.js" in page.text
    assert_secure(page)
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.content == (REPO / "search_utils/service/web/app.js").read_bytes()
    assert_secure(script)
    assert_secure(client.get("/api/health"))


def test_health_and_stats_describe_the_collection(client, collection):
    assert client.get("/api/health").json() == {"status": "ok", "model": "ready"}
    stats = client.get("/api/stats").json()
    meta = json.loads(collection.features.with_name("features.csv.meta.json").read_text())
    assert stats["count"] == COUNT + 7 == meta["count"]
    assert stats["model"] == "efficientnet_lite0" and stats["model_state"] == "ready"
    assert stats["dimension"] == meta["feature_dim"] and stats["generation"] == meta["generation"]
    assert stats["modes"] == list(MODES) and stats["default_mode"] == "chi2"
    assert stats["features_path"] == str(collection.features)
    assert stats["max_upload_bytes"] == 20 * 1024 * 1024


def test_openapi_lists_every_route_and_no_cdn_docs_page(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert_secure(response)
    paths = response.json()["paths"]
    for route, methods in ROUTES.items():
        assert methods <= set(paths[route]), (route, paths.get(route))
    search = paths["/api/search"]["get"]
    assert {p["name"] for p in search["parameters"]} >= {"id", "n", "metric", "exact", "keep_duplicates"}
    assert_error(client.get("/docs"), 404)  # the docs pages would load scripts from a CDN


def test_sample_is_indexed_ids_and_repeats_with_a_seed(client, collection):
    first = client.get("/api/sample", params={"n": 5, "seed": 7}).json()
    assert first == client.get("/api/sample", params={"n": 5, "seed": 7}).json()
    assert len(first) == 5 and [item["id"] for item in first] == sorted({item["id"] for item in first})
    for item in first:
        assert collection.ids[os.path.basename(item["path"])] == item["id"]
    assert len(client.get("/api/sample").json()) == 24
    assert len(client.get("/api/sample", params={"n": 100}).json()) == COUNT + 7  # never more than there are
    assert_error(client.get("/api/sample", params={"n": 0}), 422, "n")
    assert_error(client.get("/api/sample", params={"n": 101}), 422, "n")


# -- searches -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_answers_by_id_and_by_upload(client, real_app, collection, mode):
    name = ICONS[5].name
    row = collection.ids[name]
    by_id = client.get("/api/search", params={"id": row, "n": 5, "metric": mode})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert body["metric"] == mode and body["query_id"] == row
    hits = body["results"]
    assert body["query"] == hits[0]["path"] and body["query"].endswith(f"icons/{name}")  # spelled as results are
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["id"] == row and os.path.basename(hits[0]["path"]) == name
    assert hits[0]["distance"] == pytest.approx(0, abs=1e-6)
    distances = [hit["distance"] for hit in hits]
    assert distances == sorted(distances) and distances[1] > 1e-3
    for hit in hits:  # ids and paths name the same rows
        assert collection.ids[os.path.basename(hit["path"])] == hit["id"]

    by_upload = upload(client, real_app, collection.file(name).read_bytes(), name=name, n=5, metric=mode)
    assert by_upload.status_code == 200, by_upload.text
    uploaded = by_upload.json()
    assert uploaded["metric"] == mode and uploaded["query_id"] is None and uploaded["query"] == name
    assert uploaded["results"][0]["id"] == row  # the real model embeds it as indexing did
    assert uploaded["results"][0]["distance"] == pytest.approx(0, abs=1e-3 * distances[1])
    assert search_ids(by_upload)[:3] == search_ids(by_id)[:3]


def test_a_jpeg_upload_from_outside_the_collection(client, real_app, collection):
    response = upload(client, real_app, (REPO / "search.jpg").read_bytes(), name="search.jpg", mime="image/jpeg",
                      n=7, metric="whitened", exact="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == "search.jpg" and len(body["results"]) == 7
    assert body["results"][0]["distance"] > 1e-3  # not in the collection


def test_uploads_are_judged_by_their_bytes_not_their_name(client, real_app, collection):
    name = ICONS[6].name
    row = collection.ids[name]
    response = upload(client, real_app, collection.file(name).read_bytes(), name="notes.txt", mime="text/plain")
    assert search_ids(response)[0] == row
    assert_error(upload(client, real_app, b"just text, not a picture\n" * 40, name="fake.png"), 415)


def test_a_multi_picture_jpeg_upload_is_a_jpeg(client, real_app, collection):
    response = upload(client, real_app, collection.file("camera.jpg").read_bytes(), name="camera.jpg",
                      mime="image/jpeg", n=2)
    ids = search_ids(response)
    assert collection.ids["camera.jpg"] in ids  # camera.jpg and photo.jpg: the same first picture


def test_copies_fold_into_one_result_unless_kept(client, collection):
    row, copy = collection.ids[ICONS[0].name], collection.ids["copy-of-first.png"]
    folded = client.get("/api/search", params={"id": row, "n": 3}).json()["results"]
    assert folded[0]["id"] in (row, copy)
    assert {folded[0]["id"], *folded[0]["copy_ids"]} == {row, copy}
    assert len(folded[0]["copies"]) == 1 and folded[1]["id"] not in (row, copy)
    kept = client.get("/api/search", params={"id": row, "n": 3, "keep_duplicates": "true"}).json()["results"]
    assert {kept[0]["id"], kept[1]["id"]} == {row, copy}
    assert kept[0]["distance"] == kept[1]["distance"] == 0
    assert all(hit["copies"] == [] and hit["copy_ids"] == [] for hit in kept)


def test_exact_gives_the_same_chi2_results(client, collection):
    row = collection.ids[ICONS[7].name]
    plain = client.get("/api/search", params={"id": row, "n": 10}).json()
    exact = client.get("/api/search", params={"id": row, "n": 10, "exact": "true"}).json()
    assert plain["results"] == exact["results"]


@pytest.mark.parametrize("params", [{"metric": "bogus"}, {"n": 0}, {"n": 1000}, {"n": "five"},
                                    {"exact": "perhaps"}, {"id": "abc"}, {"id": -1}])
def test_bad_parameters_are_422(client, params):
    assert_error(client.get("/api/search", params={"id": 0, **params}), 422, next(iter(params)))


@pytest.mark.parametrize("params", [{"metric": "bogus"}, {"n": 0}, {"n": 1000}])
def test_bad_parameters_of_an_upload_are_422(client, real_app, collection, params):
    response = upload(client, real_app, collection.file(ICONS[1].name).read_bytes(), **params)
    assert_error(response, 422, next(iter(params)))


def test_an_id_not_in_the_index_is_404(client, collection):
    count = COUNT + 7
    body = assert_error(client.get("/api/search", params={"id": count}), 404, str(count))
    assert f"0 to {count - 1}" in body["error"]
    assert_error(client.get(f"/api/images/{count}"), 404)
    assert_error(client.get(f"/api/thumbnails/{count}"), 404)
    assert_error(client.get("/api/nothing-here"), 404, "/api/nothing-here")


@pytest.mark.parametrize("url", ["/api/images/%201", "/api/images/+1", "/api/images/1_0", "/api/images/-1",
                                 "/api/images/1.0", "/api/thumbnails/+1", "/api/thumbnails/1%20",
                                 "/api/search?id=1.0", "/api/search?id=%2B1", "/api/search?id=1_0",
                                 "/api/search?id=%201", "/api/search?id=1e0", "/api/search?id=" + "1" * 30])
def test_row_ids_are_plain_decimal_digits(client, url):
    assert_error(client.get(url), 422, "id", "decimal digits")


def test_a_row_id_with_leading_zeros_is_the_same_row(client, collection):
    row = collection.ids[ICONS[1].name]
    assert client.get(f"/api/images/0{row}").content == collection.file(ICONS[1].name).read_bytes()
    assert client.get("/api/search", params={"id": f"00{row}"}).json()["query_id"] == row


def test_an_upload_with_an_id_too_is_422(client, real_app, collection):
    response = upload(client, real_app, collection.file(ICONS[1].name).read_bytes(), id=3)
    assert_error(response, 422, "an image or an id, not both")


def test_a_trailing_slash_is_404_never_a_redirect_to_the_requests_host(client):
    for path in ("/api/health/", "/api/stats/", "/api/images/1/", "/api/search/"):
        response = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert_error(response, 404, path)
        assert "location" not in response.headers


@pytest.mark.parametrize("path", ["/", "/api/health", "/api/stats", "/api/sample?seed=3", "/api/search?id=2",
                                  "/api/images/2", "/api/thumbnails/2", "/static/app.js", "/openapi.json",
                                  "/api/images/9999", "/api/images/x"])
def test_head_is_answered_wherever_get_is(client, path):
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code and head.content == b"" and get.content != b""
    for name in ("content-type", "content-length", "etag", "cache-control", "x-content-type-options",
                 "content-security-policy"):
        assert head.headers.get(name) == get.headers.get(name), name


# -- upload errors -----------------------------------------------------------------


def test_upload_without_the_image_field_or_empty_or_bad_multipart_is_400(client, real_app, collection):
    png = collection.file(ICONS[1].name).read_bytes()
    missing = client.post("/api/search", files={"file": ("a.png", png, "image/png")})
    assert_error(missing, 400, "image")
    assert_error(client.post("/api/search"), 400, "image")
    assert_error(client.post("/api/search", data={"image": "not a file"}), 400, "image")
    assert_error(upload(client, real_app, b"", name="empty.png"), 400, "empty")
    garbage = client.post("/api/search", content=b"garbage",
                          headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(garbage, 400)
    assert os.listdir(real_app.state.uploads) == []


def test_a_png_text_or_profile_chunk_that_inflates_to_50_mb_is_413(client, real_app):
    """zTXt, iCCP, iTXt: 50 MB of zeros, compressed to about 51 kB, before
    the pixels (read as the file opens) or after them (read as it decodes)."""
    zeros = zlib.compress(bytes(50 << 20), 9)
    assert len(zeros) < 60_000
    bombs = {"ztxt.png": png_with(png_chunk(b"zTXt", b"note\0\0" + zeros)),
             "iccp.png": png_with(png_chunk(b"iCCP", b"profile\0\0" + zeros)),
             "itxt.png": png_with(png_chunk(b"iTXt", b"note\0\1\0\0\0" + zeros)),
             "ztxt-after.png": png_with(png_chunk(b"zTXt", b"note\0\0" + zeros), before=b"IEND")}
    for name, content in bombs.items():
        with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):  # Pillow itself refuses this real file
            Image.open(io.BytesIO(content)).load()
        assert_error(upload(client, real_app, content, name=name), 413, "decompression bomb")


def test_a_decompression_bomb_is_413(client, real_app):
    bomb = bomb_png()
    assert len(bomb) < 100_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow itself sees a bomb in this real file
        Image.open(io.BytesIO(bomb))
    assert_error(upload(client, real_app, bomb, name="bomb.png"), 413, "too many pixels")


def test_files_that_are_not_accepted_images_are_415(client, real_app, tmp_path):
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n'
    draw_picture(8).save(tmp_path / "drawing.eps")  # a real EPS, written by Pillow
    draw_picture(8).save(tmp_path / "drawing.ppm")  # an image Pillow reads, but not one the service accepts
    eps, ppm = (tmp_path / "drawing.eps").read_bytes(), (tmp_path / "drawing.ppm").read_bytes()
    assert eps.startswith(b"%!PS-Adobe")
    for content, name, mime in ((b"hello, world\n", "notes.txt", "text/plain"), (svg, "drawing.svg", "image/svg+xml"),
                                (eps, "drawing.eps", "application/postscript"), (ppm, "drawing.ppm", "image/png")):
        assert_error(upload(client, real_app, content, name=name, mime=mime), 415, "JPEG")


def broken_images(collection) -> dict[str, bytes]:
    """Real images of the accepted formats, damaged: cut short, a header
    field changed, a tEXt chunk that claims 2 GB. Each starts as its format
    does, so Pillow's decoder for it fails on it (not an unknown format)."""
    jpeg = collection.file("photo.jpg").read_bytes()
    png16 = saved(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), "PNG")
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    bmp = bytearray(collection.file("drawing.bmp").read_bytes())
    bmp[14] = 100  # the size of its info header: no BMP header is 100 bytes
    png = bytearray(png_bytes(draw_picture(9)))
    start = png.index(b"IDAT") + 4
    png[start + 10: start + 200] = bytes(190)  # zeroed compressed data: a PNG that can't decode
    return {"half.jpg": jpeg[: len(jpeg) // 2], "cut7.jpg": jpeg[:7], "cut16.jpg": jpeg[:16],
            "cut16.png": png16[:16], "cut24.png": png16[:24], "header.bmp": bytes(bmp),
            "cut16.webp": collection.file("drawing.webp").read_bytes()[:16], "zeroed.png": bytes(png),
            "huge-text.png": png_with(struct.pack(">I", 0x7FFFFFFF) + b"tEXtnote\0short")}


def test_truncated_or_corrupt_images_are_422(client, real_app, collection):
    for name, content in broken_images(collection).items():
        with pytest.raises(Exception) as raised:
            Image.open(io.BytesIO(content)).load()
        assert not isinstance(raised.value, UnidentifiedImageError), name
        assert_error(upload(client, real_app, content, name=name), 422, "broken image")


@pytest.fixture(scope="module")
def small_cap_app(collection):
    """An app accepting uploads of up to 100 kB, with a fake model (answers the first icon)."""
    app = create_app(ServiceConfig(str(collection.features), max_upload_bytes=100_000, load_model=False,
                                   make_extractor=lambda model, weights: StoredRow(app, 0)), log=lambda line: None)
    return app


def big_png(size: int) -> bytes:
    """A real PNG of more than `size` bytes (noise does not compress)."""
    side = int((size / 3) ** 0.5) + 16
    noise = np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)
    content = png_bytes(Image.fromarray(noise))
    assert len(content) > size
    return content


def test_an_upload_over_the_cap_is_413_by_length_or_streamed(small_cap_app):
    app = small_cap_app
    with TestClient(app) as client:
        assert client.get("/api/stats").json()["max_upload_bytes"] == 100_000
        big = big_png(200_000)
        assert_error(upload(client, app, big), 413, "too large")

        def chunks():  # no Content-Length: the body arrives chunked
            body = multipart(big, "big.png")
            for start in range(0, len(body), 16_384):
                yield body[start: start + 16_384]

        streamed = client.post("/api/search", content=chunks(),
                               headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert "content-length" not in {k.lower() for k in streamed.request.headers}
        assert_error(streamed, 413, "too large")
        # Over the cap, though within the room left for the form around it: refused while copied.
        between = big_png(100_000 + 1)
        assert 100_000 < len(between) < 100_000 + MULTIPART_OVERHEAD - 1000
        assert_error(upload(client, app, between), 413, "too large")
        assert os.listdir(app.state.uploads) == []
        small = png_bytes(draw_picture(4, size=(64, 64)))
        assert search_ids(upload(client, app, small))[0] == 0  # under the cap: answered
    assert not os.path.exists(app.state.uploads)


BOUNDARY = "test-boundary-5a1d"


def multipart(content: bytes, name: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


# -- served images and thumbnails --------------------------------------------------


@pytest.mark.parametrize("name", [ICONS[2].name, *[n for n in FORMAT_FILES if n != "camera.jpg"]])
def test_images_are_served_as_they_are_with_their_type(client, collection, name):
    response = client.get(f"/api/images/{collection.ids[name]}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == FORMAT_FILES.get(name, "image/png")
    assert response.content == collection.file(name).read_bytes()
    assert_secure(response)


def test_a_camera_multi_picture_jpeg_is_served_as_jpeg(client, real_app, collection):
    assert Image.open(collection.file("camera.jpg")).format == "MPO"
    answering = TestClient(real_app, raise_server_exceptions=False)  # no lifespan: the module's client has it
    response = answering.get(f"/api/images/{collection.ids['camera.jpg']}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == collection.file("camera.jpg").read_bytes()


def test_thumbnails_are_small_jpegs_revalidated_by_etag(client, collection):
    for name, side in (("photo.jpg", 256), ("camera.jpg", 256), (ICONS[3].name, None)):
        response = client.get(f"/api/thumbnails/{collection.ids[name]}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert_secure(response)
        picture = Image.open(io.BytesIO(response.content))
        assert picture.format == "JPEG" and max(picture.size) <= 256
        if side:
            assert picture.size == (256, 192)  # 640x480 shrunk, proportions kept
        etag = response.headers["etag"]
        again = client.get(f"/api/thumbnails/{collection.ids[name]}", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert_secure(again)
        other = client.get(f"/api/thumbnails/{collection.ids[name]}", headers={"If-None-Match": '"other"'})
        assert other.status_code == 200 and other.content == response.content
    etags = {client.get(f"/api/thumbnails/{collection.ids[n]}").headers["etag"] for n in ("photo.jpg", "drawing.gif")}
    assert len(etags) == 2


@contextlib.contextmanager
def moved_away(path: Path, to: Path):
    os.replace(path, to)
    try:
        yield
    finally:
        os.replace(to, path)


def test_a_row_whose_file_is_gone_is_404(client, collection, tmp_path):
    name = ICONS[COUNT - 1].name
    row = collection.ids[name]
    assert client.get(f"/api/thumbnails/{row}").status_code == 200  # cached now: still refused once gone
    with moved_away(collection.file(name), tmp_path / name):
        assert_error(client.get(f"/api/images/{row}"), 404, "no longer there")
        assert_error(client.get(f"/api/thumbnails/{row}"), 404)
        assert search_ids(client.get("/api/search", params={"id": row}))[0] == row  # its features remain
    assert client.get(f"/api/images/{row}").status_code == 200


def test_a_row_now_a_symlink_outside_the_folder_is_404_and_never_leaks(client, collection, tmp_path):
    name = ICONS[COUNT - 2].name
    row = collection.ids[name]
    path = collection.file(name)
    secret = collection.folder / "outside" / "secret.png"
    with moved_away(path, tmp_path / name):
        path.symlink_to(secret)
        try:
            assert path.read_bytes() == secret.read_bytes()  # the link opens the outside file
            answers = [client.get(f"/api/images/{row}"), client.get(f"/api/thumbnails/{row}")]
            assert_error(answers[0], 404, "outside the indexed folder")
            assert_error(answers[1], 404)
            answers.append(client.get("/api/search", params={"id": row, "n": 100, "keep_duplicates": "true"}))
            answers.append(client.get("/api/sample", params={"n": 100}))
            for response in answers:
                assert SECRET not in response.content
        finally:
            path.unlink()
        # A link that stays inside the folder is served.
        path.symlink_to(collection.file(ICONS[2].name))
        try:
            inside = client.get(f"/api/images/{row}")
            assert inside.status_code == 200 and inside.content == collection.file(ICONS[2].name).read_bytes()
        finally:
            path.unlink()


def test_a_file_that_goes_between_the_check_and_the_read_is_404(client, collection, tmp_path, monkeypatch):
    """The window made certain: the file goes just after the route's check found it."""
    from search_utils.service import app as service_app

    name = ICONS[COUNT - 3].name
    row = collection.ids[name]
    real_check = service_app.indexed_file

    def check_then_lose(searcher, asked):
        found = real_check(searcher, asked)
        os.replace(collection.file(name), tmp_path / name)
        return found

    monkeypatch.setattr(service_app, "indexed_file", check_then_lose)
    for route in ("images", "thumbnails"):  # this row's thumbnail was never made: not cached
        try:
            body = assert_error(client.get(f"/api/{route}/{row}"), 404, f"image {row}", "no longer there")
        finally:
            os.replace(tmp_path / name, collection.file(name))
        assert f"icons/{name}" in body["error"] and str(collection.folder) not in body["error"]


def test_a_row_whose_file_is_no_longer_an_image_is_404_naming_its_stored_path(client, collection, tmp_path):
    name = ICONS[COUNT - 4].name
    row = collection.ids[name]
    with moved_away(collection.file(name), tmp_path / name):
        collection.file(name).write_text("not a picture any more\n")
        answers = [client.get(f"/api/images/{row}"), client.get(f"/api/thumbnails/{row}")]
    for response in answers:
        body = assert_error(response, 404, f"image {row}", f"icons/{name}")
        assert str(collection.folder) not in body["error"]  # the server's own folders stay unnamed


@pytest.mark.parametrize("url", ["/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/%2E%2E%2Ffeatures.csv",
                                 "/static/..%2F..%2Fsearch_server.py", "/static/%2e%2e/service.py",
                                 "/static/../search_server.py", "/api/thumbnails/..%2Fsecret.png"])
def test_traversal_attempts_are_404(client, url):
    response = assert_error(client.get(url), 404)
    assert "root:" not in json.dumps(response) and "def " not in json.dumps(response)


# -- headers: security, CORS ----------------------------------------------------------


def test_no_cors_by_default(client):
    for response in (client.get("/api/stats", headers={"Origin": "http://elsewhere.example"}),
                     client.options("/api/search", headers={"Origin": "http://elsewhere.example",
                                                            "Access-Control-Request-Method": "POST"})):
        assert "access-control-allow-origin" not in response.headers
        assert_secure(response)


def test_cors_for_the_allowed_origin_only(collection):
    app = create_app(ServiceConfig(str(collection.features), load_model=False,
                                   cors_origins=["http://localhost:3000"]), log=lambda line: None)
    with TestClient(app) as client:
        allowed = client.get("/api/stats", headers={"Origin": "http://localhost:3000"})
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert_secure(allowed)
        missing = client.get("/api/images/9999", headers={"Origin": "http://localhost:3000"})
        assert_error(missing, 404)
        assert missing.headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = client.options("/api/search", headers={"Origin": "http://localhost:3000",
                                                          "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert_secure(preflight)
        refused = client.options("/api/search", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
        assert_error(refused, 400, "CORS")  # JSON, with the security headers
        other = client.get("/api/stats", headers={"Origin": "http://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_refusals_by_the_middlewares_carry_cors_for_the_allowed_origin(collection):
    """A page of an allowed origin can read the 413 and 503 the middleware
    answers by itself (CORS must wrap them), with the security headers."""
    origin = {"Origin": "http://localhost:3000"}
    app, release, fakes = blocking_app(collection, max_upload_bytes=100_000, max_requests=1,
                                       cors_origins=["http://localhost:3000"])
    answers: list = []
    with TestClient(app) as client:
        big = client.post("/api/search", files={"image": ("big.png", big_png(200_000), "image/png")}, headers=origin)
        assert_error(big, 413, "too large")
        try:
            first = upload_holding_the_model(client, app, collection.file(ICONS[1].name).read_bytes(), answers, fakes)
            busy = client.get("/api/stats", headers=origin)
        finally:
            release.set()
        first.join(PATIENCE)
    assert_error(busy, 503, "busy")
    assert [big.headers.get("access-control-allow-origin"), busy.headers.get("access-control-allow-origin")] == [
        "http://localhost:3000"] * 2


def test_bad_ranges_of_files_are_json_errors(client):
    script = (REPO / "search_utils/service/web/app.js").read_bytes()
    for path in ("/static/app.js", "/"):
        beyond = client.get(path, headers={"Range": "bytes=99999999-"})
        assert_error(beyond, 416, "range not satisfiable")
        assert beyond.headers["content-range"].startswith("bytes */")
        assert_error(client.get(path, headers={"Range": "bytes=abc"}), 400, "Range")
    part = client.get("/static/app.js", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == script[:10]


def test_an_internal_error_is_one_json_line_with_the_security_headers(collection):
    """A route that fails unexpectedly (added here: the service has no
    known way to fail) still answers one JSON line, logged, with the headers."""
    logged: list[str] = []
    app = create_app(ServiceConfig(str(collection.features), load_model=False), log=logged.append)

    @app.get("/api/test-failure")
    def failure():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/test-failure")
    assert response.status_code == 500 and response.json() == {"error": "internal error (logged by the service)",
                                                                "status": 500}
    assert any("RuntimeError: a bug" in line for line in logged)
    assert_secure(response)


# -- the model's limits (a fake model that blocks until released) --------------------


class StoredRow:
    """A fake extractor: answers the stored features of `row` for any image,
    after waiting for `release` (set it to let calls through)."""

    def __init__(self, app, row: int, release: threading.Event | None = None):
        self.app, self.row = app, row
        self.entered = threading.Event()
        self.release = release
        self.calls = 0

    def embed(self, batch):
        self.calls += 1
        self.entered.set()
        if self.release is not None:
            assert self.release.wait(PATIENCE)
        features = np.asarray(self.app.state.index.current().store.features[self.row], np.float32)
        return np.repeat(features[np.newaxis], len(batch), axis=0)


def blocking_app(collection, **config):
    release = threading.Event()
    fakes: list[StoredRow] = []

    def make(model, weights):
        fakes.append(StoredRow(app, 3, release))
        return fakes[-1]

    app = create_app(ServiceConfig(str(collection.features), load_model=False, make_extractor=make, **config),
                     log=lambda line: None)
    return app, release, fakes


def post_in_thread(client, app, content: bytes, answers: list):
    thread = threading.Thread(target=lambda: answers.append(upload(client, app, content)), daemon=True)
    thread.start()
    return thread


def upload_holding_the_model(client, app, content: bytes, answers: list, fakes: list):
    """An upload in a thread, once the (blocking) model holds it."""
    thread = post_in_thread(client, app, content, answers)
    wait_until(lambda: fakes and fakes[0].entered.is_set(), "the first upload reaches the model")
    return thread


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_too_many_uploads_waiting_is_503(collection):
    app, release, fakes = blocking_app(collection, model_calls=1, max_waiting=1, wait_seconds=PATIENCE)
    content = collection.file(ICONS[1].name).read_bytes()
    answers: list = []
    with TestClient(app) as client:
        try:
            first = upload_holding_the_model(client, app, content, answers, fakes)
            second = post_in_thread(client, app, content, answers)
            wait_until(lambda: app.state.model._waiting == 1, "the second upload waits for the model")
            assert os.listdir(app.state.uploads) == []  # waiting uploads hold no file
            assert_error(upload(client, app, content), 503, "busy")
            assert client.get("/api/search", params={"id": 1}).status_code == 200  # searches by id go on
        finally:
            release.set()
        first.join(PATIENCE), second.join(PATIENCE)
        assert [search_ids(answer)[0] for answer in answers] == [3, 3]
        assert len(fakes) == 1  # built once


def test_too_many_requests_in_progress_is_503(collection):
    app, release, fakes = blocking_app(collection, max_requests=1)
    answers: list = []
    with TestClient(app) as client:
        try:
            first = upload_holding_the_model(client, app, collection.file(ICONS[1].name).read_bytes(), answers, fakes)
            assert_error(client.get("/api/stats"), 503, "busy")
        finally:
            release.set()
        first.join(PATIENCE)
        assert search_ids(answers[0])[0] == 3
        assert client.get("/api/stats").status_code == 200  # free again


def test_waiting_too_long_for_the_model_is_503(collection):
    app, release, fakes = blocking_app(collection, model_calls=1, wait_seconds=0.5)
    content = collection.file(ICONS[1].name).read_bytes()
    answers: list = []
    with TestClient(app) as client:
        try:
            first = upload_holding_the_model(client, app, content, answers, fakes)
            assert_error(upload(client, app, content), 503, "waited")
        finally:
            release.set()
        first.join(PATIENCE)
        assert search_ids(answers[0])[0] == 3
        assert search_ids(upload(client, app, content))[0] == 3  # free again: answered


def test_a_model_that_cannot_be_loaded_is_503_for_uploads_only_tried_and_logged_once(collection):
    builds: list = []
    logged: list[str] = []

    def make(model, weights):
        builds.append(weights)
        raise WeightsUnavailableError("no weights here (test)")

    app = create_app(ServiceConfig(str(collection.features), load_model=True, make_extractor=make), log=logged.append)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/api/health").json()["model"].startswith("unavailable"), "the build fails")
        assert "no weights here" in client.get("/api/health").json()["model"]
        for _ in range(3):
            response = upload(client, app, collection.file(ICONS[1].name).read_bytes())
            assert_error(response, 503, "the model can't be loaded", "no weights here")
        assert search_ids(client.get("/api/search", params={"id": 2}))[0] == 2
    assert len(builds) == 1, builds  # at start-up only: not again for each upload
    assert [line for line in logged if "can't be embedded" in line] == [
        "warning: uploaded queries can't be embedded: no weights here (test)"]


def test_a_burst_of_uploads_decodes_at_most_the_bound_at_once(collection, monkeypatch):
    """A small file can decode to hundreds of MB: a burst waits its turn to
    decode (observed in the real decoder, held until the test lets it go)."""
    from search_utils import images

    real_decode, release, lock = images.load_image, threading.Event(), threading.Lock()
    decoding, most = [0], [0]

    def held_decode(*args, **kwargs):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            assert release.wait(PATIENCE)
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(images, "load_image", held_decode)
    app = create_app(ServiceConfig(str(collection.features), load_model=False, decodes=2, wait_seconds=PATIENCE,
                                   make_extractor=lambda model, weights: StoredRow(app, 3)), log=lambda line: None)
    content, burst, answers = collection.file(ICONS[1].name).read_bytes(), 6, []
    with TestClient(app) as client:
        def send():
            answers.append(client.post("/api/search", files={"image": ("q.png", content, "image/png")}))

        threads = [threading.Thread(target=send, daemon=True) for _ in range(burst)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: decoding[0] + app.state.model._waiting == burst, "each upload decodes or waits")
            at_once = decoding[0]
        finally:
            release.set()
        for thread in threads:
            thread.join(PATIENCE)
    assert at_once == most[0] == 2  # asserted once every request is done: a failure never hangs the client
    assert [search_ids(answer)[0] for answer in answers] == [3] * burst


def test_a_start_up_that_fails_leaves_no_upload_folder(collection):
    def make(model, weights):
        raise RuntimeError("not a user's problem: a bug (test)")

    app = create_app(ServiceConfig(str(collection.features), load_model=True, make_extractor=make),
                     log=lambda line: None)
    with pytest.raises(RuntimeError, match="a bug"):
        with TestClient(app):
            pass
    assert app.state.uploads and not os.path.exists(app.state.uploads)


def test_chi2_over_negative_features_is_422_saying_which_modes_can(tmp_path):
    from search_utils import store

    features = np.random.default_rng(0).gamma(0.5, 0.6, size=(6, 1280)).astype(np.float32)
    features[2, 5] = -3.0
    store.save_features(str(tmp_path / "f.csv"), store.FeatureStore(
        [f"imgs/row{i}.jpg" for i in range(6)], features, {"model": "efficientnet_lite0", "feature_dim": 1280}, None))
    app = create_app(ServiceConfig(str(tmp_path / "f.csv"), load_model=False), log=lambda line: None)
    with TestClient(app) as client:
        assert_error(client.get("/api/search", params={"id": 0}), 422, "non-negative", "cosine or euclidean")
        assert search_ids(client.get("/api/search", params={"id": 2, "metric": "cosine"}))[0] == 2


def test_a_features_file_that_cannot_be_reloaded_is_said_once_per_problem(collection, tmp_path, monkeypatch):
    from search_utils.service import live

    monkeypatch.setattr(live, "RELOAD_RETRY_SECONDS", 0.0)  # every request retries: the log must not
    for path in collection.features.parent.glob("features.csv*"):
        shutil.copy(path, tmp_path / path.name)
    features = tmp_path / "features.csv"
    logged: list[str] = []
    app = create_app(ServiceConfig(str(features), load_model=False), log=logged.append)
    with TestClient(app) as client:
        for _ in range(2):  # gone, back as a new generation; gone again
            features.rename(tmp_path / "kept.csv")
            for _ in range(5):
                assert client.get("/api/stats").json()["count"] == COUNT + 7  # the previous one, served
            shutil.copy(tmp_path / "kept.csv", features)
            assert client.get("/api/stats").status_code == 200
            (tmp_path / "kept.csv").unlink()
    warnings_, loaded = ([line for line in logged if line.startswith(start)]
                         for start in ("warning: could not load", "loaded the new generation"))
    assert len(warnings_) == 2 and "not found" in warnings_[0], logged
    assert len(loaded) == 2, logged


def test_the_upload_folder_is_removed_at_shutdown(collection):
    app, release, _ = blocking_app(collection)
    release.set()
    with TestClient(app) as client:
        assert os.path.isdir(app.state.uploads)
        assert search_ids(upload(client, app, collection.file(ICONS[1].name).read_bytes()))[0] == 3
        assert_error(upload(client, app, b"not an image"), 415)
    assert not os.path.exists(app.state.uploads)
