"""encoders.image_io: every Pillow mode to RGB with the right pixels, EXIF rotation, and one clear
ImageLoadError per kind of bad file."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from encoders import ImageLoadError, load_image


def pixels(im: Image.Image) -> list[tuple[int, int, int]]:
    assert im.mode == "RGB"
    return list(im.get_flattened_data())


def close(got, want, tol=1):
    return all(abs(a - b) <= tol for a, b in zip(got, want, strict=True))


def jpeg_bytes(im: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **save_kwargs)
    return buf.getvalue()


def noise_jpeg(width=64, height=48, seed=0) -> bytes:
    """A JPEG of random noise: large enough that cutting it leaves scan data missing."""
    rng = np.random.default_rng(seed)
    return jpeg_bytes(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))


# --- modes ---------------------------------------------------------------------------------------


def test_rgba_composited_on_white():
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent -> white background
    im.putpixel((1, 0), (255, 0, 0, 128))  # half red over white: G = B = 255 * (1 - 128/255) = 127
    im.putpixel((2, 0), (10, 20, 30, 255))  # opaque: unchanged
    got = pixels(load_image(im))
    assert got[0] == (255, 255, 255)
    assert close(got[1], (255, 127, 127))
    assert got[2] == (10, 20, 30)


def test_la_and_premultiplied_la():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))
    la.putpixel((1, 0), (100, 255))
    assert pixels(load_image(la)) == [(255, 255, 255), (100, 100, 100)]
    # "La" stores L premultiplied by alpha: L=100 at alpha 128 is grey 199 at half opacity,
    # over white: 199 * 128/255 + 255 * 127/255 = 227.
    assert close(pixels(load_image(Image.new("La", (1, 1), (100, 128))))[0], (227, 227, 227))


def test_palette_with_transparency_index_from_png(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([200, 10, 10, 0, 0, 255])
    im.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    im.save(path, transparency=1)  # palette index 1 is transparent (PNG tRNS chunk)
    assert pixels(load_image(path)) == [(200, 10, 10), (255, 255, 255)]


def test_pa_mode():
    im = Image.new("PA", (2, 1))
    im.putpalette([0, 200, 0] * 256)
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    assert pixels(load_image(im)) == [(255, 255, 255), (0, 200, 0)]


def test_p_l_and_1():
    p = Image.new("P", (1, 1))
    p.putpalette([12, 34, 56])
    assert pixels(load_image(p)) == [(12, 34, 56)]
    assert pixels(load_image(Image.new("L", (1, 1), 77))) == [(77, 77, 77)]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert pixels(load_image(one)) == [(0, 0, 0), (255, 255, 255)]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (3, 1))
    im.putpixel((0, 0), 65535)
    im.putpixel((1, 0), 257 * 100)  # clipping would give 255
    im.putpixel((2, 0), 0)
    path = tmp_path / "deep.png"
    im.save(path)
    assert Image.open(path).mode == "I;16"
    for src in (im, path):
        assert pixels(load_image(src)) == [(255, 255, 255), (100, 100, 100), (0, 0, 0)]
    dim = Image.new("I;16", (2, 1), 257 * 50)  # a dark 16-bit image stays dark: no contrast stretch
    dim.putpixel((1, 0), 257 * 100)
    assert pixels(load_image(dim)) == [(50, 50, 50), (100, 100, 100)]


def test_32_bit_int_and_float():
    i32 = Image.new("I", (2, 1))
    i32.putpixel((0, 0), 257 * 40)
    i32.putpixel((1, 0), 65535)  # values above 255 mean a 16-bit range
    assert pixels(load_image(i32)) == [(40, 40, 40), (255, 255, 255)]
    f = Image.new("F", (2, 1))
    f.putpixel((0, 0), 0.5)  # floats in [0, 1] scale by 255
    f.putpixel((1, 0), 1.0)
    assert pixels(load_image(f)) == [(128, 128, 128), (255, 255, 255)]


def test_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan: (0, 255, 255)
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # full black
    assert pixels(load_image(cmyk)) == [(255, 255, 255), (0, 255, 255), (0, 0, 0)]
    ycc = Image.new("YCbCr", (2, 1))
    ycc.putpixel((0, 0), (128, 128, 128))  # neutral chroma: grey
    ycc.putpixel((1, 0), (76, 85, 255))  # BT.601 red
    got = pixels(load_image(ycc))
    assert close(got[0], (128, 128, 128))
    assert close(got[1], (255, 0, 0), tol=3)


# --- sources ----------------------------------------------------------------------------------------


def test_every_source_type_gives_the_same_loaded_image(tmp_path):
    im = Image.new("RGB", (4, 3), (1, 2, 3))
    im.putpixel((2, 1), (250, 128, 0))
    path = tmp_path / "img.png"
    im.save(path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        from_file = load_image(f)
        assert not f.closed  # the caller owns the file object
    want = pixels(im)
    for out in (load_image(path), load_image(str(path)), load_image(data), from_file, load_image(im)):
        assert out.size == (4, 3) and pixels(out) == want

    loaded = load_image(path)
    path.unlink()  # fully decoded: no lazy read of the file later
    assert pixels(loaded) == want


def test_exif_orientation_6_rotates():
    im = Image.new("RGB", (32, 16), (220, 20, 20))  # stored: left half red, right half blue
    im.paste((20, 20, 220), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = jpeg_bytes(im, exif=exif)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6

    out = load_image(data)
    assert out.size == (16, 32)  # portrait after rotation
    assert close(out.getpixel((8, 8)), (220, 20, 20), tol=12)  # the left half is now on top
    assert close(out.getpixel((8, 24)), (20, 20, 220), tol=12)

    plain = load_image(jpeg_bytes(im))  # no orientation tag: unchanged
    assert plain.size == (32, 16)
    assert close(plain.getpixel((8, 8)), (220, 20, 20), tol=12)


# --- errors -------------------------------------------------------------------------------------


def expect_error(src, *words, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as err:
        load_image(src, **kwargs)
    message = str(err.value)
    for word in words:
        assert word in message, message
    return message


def test_truncated_jpeg(tmp_path):
    data = noise_jpeg()
    path = tmp_path / "photo.jpg"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "photo.jpg", "truncated or corrupt image")
    expect_error(data[: len(data) // 2], "<bytes>", "truncated or corrupt image")


def test_truncation_detected_even_if_pillow_global_allows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = noise_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "cut.jpg", "truncated or corrupt image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is restored


def test_corrupt_png_data(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 20] = b"\x00" * 12  # clobber the compressed pixel stream
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    expect_error(path, "broken.png", "truncated or corrupt image")


def test_random_bytes_are_not_an_image():
    expect_error(b"\x13\x37" * 100, "<bytes>", "not an image")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    expect_error(path, "notes.png", "not an image")


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    expect_error(empty, "empty.jpg", "empty file (0 bytes)")
    expect_error(b"", "<bytes>", "empty file (0 bytes)")
    expect_error(tmp_path / "nowhere.jpg", "nowhere.jpg", "file not found")
    expect_error(tmp_path, str(tmp_path), "directory")


def test_too_large_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 10)).save(path)
    expect_error(path, "big.png", "image too large: 20 x 10 = 200 pixels > 100", max_pixels=100)
    assert load_image(path, max_pixels=200).size == (20, 10)
    # A truncated file whose header says "too large" is reported as too large: no decode happened.
    data = noise_jpeg(64, 48)
    expect_error(data[: len(data) // 2], "image too large", max_pixels=64 * 48 - 1)
    expect_error(Image.new("L", (20, 10)), "<PIL image>", "image too large", max_pixels=100)


def test_pixels_in_memory_load_as_the_same_image():
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pil = Image.fromarray(hwc)
    want = np.asarray(load_image(pil))
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    for src in (hwc, hwc.transpose(2, 0, 1), hwc / 255.0, chw, chw.float() / 255,
                np.dstack([hwc, np.full((20, 30, 1), 255, np.uint8)])):
        got = load_image(src)
        assert got.mode == "RGB" and got.size == (30, 20)
        assert (np.asarray(got) == want).all(), type(src)
    assert (np.asarray(load_image(chw.bfloat16() / 255)) == want).mean() > 0.9  # numpy has no bfloat16
    gray = load_image(hwc[..., 0])
    assert gray.mode == "RGB" and (np.asarray(gray)[..., 1] == hwc[..., 0]).all()
    for bad, msg in ((np.zeros((2, 20, 30, 3), np.uint8), "not one image"), (hwc * 2.0, r"\[0, 1\]"),
                     (hwc.astype(np.int32), "int32"), (torch.zeros(5, 8, 8), "not one image")):
        with pytest.raises(ImageLoadError, match=msg):
            load_image(bad)
