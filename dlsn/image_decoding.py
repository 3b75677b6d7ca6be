"""Decoding an image file to 8-bit RGB, exactly where PIL alone would not be (``decode_image``).

Greyscale files become RGB (the grey value copied to the three channels); alpha is dropped (premultiplied
colour divided by it first: ``round(255 * c / a)``); 16 bits per channel become 8 (rounded: ``round(v / 257)``,
grey and RGB alike, PNG, TIFF, also one plane per channel, and PPM; a PGM/PPM's samples ``round(v * 255 /
maxval)``); integer greyscale TIFFs are mapped from the range their tags declare (unsigned b bits
``round(v * 255 / (2^b - 1))``, e.g. 12 or 32 bits; signed ones from ``-2^(b-1)..2^(b-1)-1`` to 0..255);
floating-point greyscale is read only in 0..1 (``round(255 v)``; other values are refused, their range
being unknown); CMYK becomes RGB by PIL's naive ``(1 - C)(1 - K)``, from all 16 bits of a 16-bit TIFF; an
EXIF orientation is applied, so the pixels stand as a viewer shows them. ``decode_image`` says which of
these a file went through.

An image is checked before it is decoded: its header's size against ``max_pixels`` (default
``DEFAULT_MAX_PIXELS``, 64 Mpx), and PIL's decompression-bomb check; both refusals are a one-line
:class:`~dlsn.errors.UserInputError` naming the file, so tools list it with the other failed images.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from dlsn.errors import UserInputError, one_line

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "describe_conversion"]

# 64 Mpx: an 8000x8000 photo. Past it a whole-image pass of the paper network needs tens of GB (a 100 Mpx
# image asked the allocator for 12.8 GB at its first convolution); tools take a higher limit as a flag.
DEFAULT_MAX_PIXELS = 64_000_000
# PIL's own decompression-bomb limit is a process-wide setting; it is raised only while a caller that asked
# for more than it reads a header, under this lock.
_PIL_LIMIT_LOCK = threading.Lock()

PathLike = str | os.PathLike


def _tile_rawmode(image: Image.Image) -> str:
    """How the file stores its pixels (e.g. ``RGB;16B`` for a 48-bit PNG), read before decoding."""
    tile = getattr(image, "tile", None) or []
    args = getattr(tile[0], "args", None) if tile else None
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else ""


def describe_conversion(image: Image.Image) -> str | None:
    """What reading ``image`` (not yet decoded) as 8-bit RGB changes, or None for 8-bit RGB files.

    PIL opens 16-bit-per-channel RGB(A) PNGs, TIFFs and PPMs as 8-bit ``RGB``/``RGBA`` (only the file's
    raw mode, a TIFF's BitsPerSample tag or a PPM's maxval tells), so these are consulted before the
    pixels are decoded.
    """
    mode, rawmode = image.mode, _tile_rawmode(image)
    declared = _declared_grey(image)
    if declared is not None:
        return declared[2]
    sixteen = ";16" in rawmode or (image.format == "TIFF" and 16 in _tiff_tuple(image, _BITS_PER_SAMPLE))
    maxval = _netpbm_maxval(image)
    if maxval is not None and maxval != 255 and mode in ("L", "I", "RGB"):
        kind = {"L": "greyscale", "I": "16-bit greyscale", "RGB": "16-bit RGB" if maxval > 255 else "RGB"}[mode]
        return kind if maxval == 65535 else f"{kind}, maxval {maxval}"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return "16-bit greyscale"
    if mode == "I":
        return "32-bit integer greyscale"
    if mode == "F":
        return f"floating-point greyscale, {_FLOAT_RULE}"
    if mode == "CMYK" and sixteen:
        return "16-bit CMYK"
    if mode == "RGB":
        return "16-bit RGB" if sixteen else None
    if mode == "RGBA":
        return ("16-bit RGBA" if sixteen else "RGBA") + ", alpha dropped"
    if mode == "P":
        return "palette with transparency, alpha dropped" if "transparency" in image.info else "palette"
    names = {"L": "greyscale", "LA": "greyscale with alpha, alpha dropped", "PA": "palette with alpha, "
             "alpha dropped", "1": "1-bit black and white", "CMYK": "CMYK", "YCbCr": "YCbCr",
             "RGBa": "premultiplied RGBA, alpha dropped", "La": "greyscale with alpha, alpha dropped"}
    return names.get(mode, f"mode {mode}")


def _netpbm_maxval(image: Image.Image) -> int | None:
    """A PGM's or PPM's maxval (its largest sample value, declared in the header), read from the tile PIL
    set up before decoding; None for other files and for bitmaps (``P1``/``P4``) and float maps (``Pf``)."""
    tile = getattr(image, "tile", None) or []
    if image.format != "PPM" or len(tile) != 1:
        return None
    codec, args = tile[0][0], tile[0][3]
    if codec in ("ppm", "ppm_plain") and isinstance(args, tuple):
        return int(args[-1])  # (rawmode, maxval): the decoders that rescale
    if codec == "raw" and args in ("L", "RGB", "I;16B"):
        return 65535 if args == "I;16B" else 255  # the two maxvals PIL copies as they are
    return None


# The 16-bit unpackers of the other byte order (``N``: this machine's) read the other byte of each sample.
_OTHER_BYTE_ORDER = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}
# TIFF tags
_BITS_PER_SAMPLE = 258
_PHOTOMETRIC = 262  # 0: grey with 0 white, 1: grey with 0 black, 2: RGB
_PLANAR_CONFIGURATION = 284  # 1 all channels of a pixel together, 2 one plane per channel
_EXTRA_SAMPLES = 338  # per extra channel: 0 unspecified, 1 associated (premultiplied) alpha, 2 unassociated alpha
_SAMPLE_FORMAT = 339  # 1 unsigned integer (the default), 2 signed integer, 3 floating point
_GREY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "I;16N")
_LIBTIFF_NATIVE = {"I;16S": "I;16NS", "I;16BS": "I;16NS", "I;32S": "I;32NS", "I;32BS": "I;32NS",
                   "F;32F": "F;32NF", "F;32BF": "F;32NF"}


def _declared_grey(image: Image.Image) -> tuple[int, int, str] | None:
    """For a TIFF that PIL opens as integer greyscale other than unsigned 8-bit: the range of its samples
    that the BitsPerSample and SampleFormat tags declare, ``(lowest, highest, note)``; None otherwise.

    PIL's modes do not say it: 12-bit samples come as ``I;16`` (0..4095 in 0..65535), signed and 32-bit
    ones as ``I``, and signed 8-bit ones as ``L`` (the bytes as unsigned).
    """
    if image.format != "TIFF" or image.mode not in _GREY_MODES:
        return None
    bits = (_tiff_tuple(image, _BITS_PER_SAMPLE) or (8,))[0]
    if _tiff_tuple(image, _SAMPLE_FORMAT)[:1] == (2,):
        lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return lowest, highest, f"signed {bits}-bit greyscale, {lowest}..{highest} mapped to 0..255"
    return None if image.mode == "L" else (0, 2 ** bits - 1, f"{bits}-bit greyscale")


def _tiff_tuple(image: Image.Image, tag: int) -> tuple:
    """A TIFF tag's values as a tuple (empty when the tag is absent)."""
    value = image.tag_v2.get(tag, ())  # type: ignore[attr-defined]
    return value if isinstance(value, tuple) else (value,)


def _sixteen_bit_rgb(path: Path, image: Image.Image, rawmode: str, max_pixels: int | None) -> np.ndarray | None:
    """A 16-bit-per-channel RGB(A) PNG, TIFF or PPM, or a 16-bit CMYK TIFF, as ``[H, W, 3 or 4]`` uint16 (the
    stored samples, alpha included), or None when ``image`` is not one.

    PIL decodes such files to 8 bits by keeping each value's high byte (truncation). Its decoders can
    also keep the low bytes instead (the other byte order's raw mode of the same pixels, so decompression
    and unfiltering are the same), so the file is decoded twice and the two byte planes are put back
    together. ``image`` is the loaded file, ``rawmode`` its raw mode read before loading (``_tile_rawmode``).
    TIFFs with one plane per channel are not handled here (PIL's TIFF decoder ignores the raw mode there:
    ``_planar_tiff``); premultiplied ones come here after ``_keep_premultiplied``.
    """
    if (image.format not in ("PNG", "TIFF", "PPM") or image.mode not in ("RGB", "RGBA", "CMYK")
            or rawmode[:-1] not in ("RGB;16", "RGBA;16", "RGBX;16", "CMYK;16") or rawmode[-1:] not in _OTHER_BYTE_ORDER
            or (image.format == "TIFF" and image.tag_v2.get(_PLANAR_CONFIGURATION, 1) != 1)):
        return None
    high = np.asarray(image, dtype=np.uint16)  # the loaded high bytes
    with _open_checked(path, max_pixels) as again:
        low_rawmode = rawmode[:-1] + _OTHER_BYTE_ORDER[rawmode[-1]]
        _keep_netpbm_samples(again)  # a PPM's tile as the first decode had it
        again.tile = [_with_rawmode(tile, low_rawmode) for tile in again.tile]
        again.load()
        low = np.asarray(again, dtype=np.uint16)
    return (high << 8) | low


def _keep_premultiplied(image: Image.Image) -> bool:
    """For a TIFF with premultiplied alpha (raw mode ``RGBa...``), not yet loaded: have PIL decode the
    stored samples as they are (``RGBA...``) and return True; False for other images.

    PIL's ``RGBa`` unpackers divide by alpha rounding down, and from the high byte only for 16 bits;
    ``_to_eight_bits`` divides with rounding instead, from all 16 bits.
    """
    rawmode = _tile_rawmode(image)
    if image.format != "TIFF" or not rawmode.startswith("RGBa"):
        return False
    image.tile = [_with_rawmode(tile, "RGBA" + rawmode[4:]) for tile in image.tile]
    return True


def _planar_tiff(path: Path, image: Image.Image) -> np.ndarray | None:
    """The samples of a TIFF with one plane per channel that PIL cannot read exactly, as stored
    (``[H, W, S]``, not turned by its orientation), read with tifffile; None for every other image.

    PIL reads 16-bit planes (RGB or CMYK) as 8-bit ones when uncompressed (wrong pixels) and keeps the high
    bytes when compressed, and cannot read planar premultiplied alpha. tifffile reads uncompressed, Deflate and
    PackBits planes by itself; other compressions (LZW) need the imagecodecs package, and without it the
    file is refused as one line that says how to convert it.
    """
    if (image.format != "TIFF" or image.tag_v2.get(_PLANAR_CONFIGURATION, 1) != 2  # type: ignore[attr-defined]
            or image.tag_v2.get(_PHOTOMETRIC) not in (2, 5)  # type: ignore[attr-defined]
            or image.mode not in ("RGB", "RGBA", "CMYK")
            or (16 not in _tiff_tuple(image, _BITS_PER_SAMPLE) and 1 not in _tiff_tuple(image, _EXTRA_SAMPLES))):
        return None
    what = f"a {max(_tiff_tuple(image, _BITS_PER_SAMPLE))}-bit TIFF with one plane per channel"
    try:
        import tifffile
    except ImportError as error:
        raise UserInputError(f"cannot read image {path}: {what} needs the tifffile package; install it or "
                             f"convert the file to one plane for all channels (tiffcp -p contig)") from error
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        if page.compression not in tifffile.TIFF.DECOMPRESSORS:
            compression = getattr(page.compression, "name", page.compression)
            raise UserInputError(f"cannot read image {path}: {what} and {compression} compression cannot be read "
                                 f"exactly without the imagecodecs package; install it, or convert the file to "
                                 f"Deflate or to one plane for all channels (tiffcp -c zip -p contig in.tif out.tif)")
        try:
            samples = page.asarray()
        except Exception as error:  # a damaged file: tifffile's errors vary (ValueError, zlib.error, ...)
            raise UserInputError(f"cannot read image {path}: {one_line(error)}") from error
        separate, _, height, width, _ = page.shaped
    # shaped: (planes, depth, height, width, samples per plane); here every plane holds one channel
    return np.moveaxis(samples.reshape(separate, height, width), 0, -1)


def _with_rawmode(tile: object, rawmode: str) -> object:
    """``tile`` (an ``ImageFile._Tile`` or the older plain tuple) decoding with ``rawmode``."""
    name, extents, offset, args = tile  # type: ignore[misc]
    args = (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode
    return type(tile)((name, extents, offset, args)) if type(tile) is tuple else tile._replace(args=args)  # type: ignore[attr-defined]


def _to_eight_bits(samples: np.ndarray, top: int, premultiplied: bool = False) -> np.ndarray:
    """Stored samples (``[H, W]`` grey or ``[H, W, C]`` colour, 0..``top``) -> ``[H, W, 3]`` uint8,
    ``round(v * 255 / top)``; extra channels dropped. ``premultiplied``: the colour is first divided by the
    alpha (the fourth channel), ``round(255 * c / a)``, and is black where the alpha is 0.
    """
    values = samples.astype(np.float64)  # exact: integers below 2**53
    if values.ndim == 2:
        values = np.repeat(values[:, :, None], 3, axis=2)
    colour = values[:, :, :3]
    if premultiplied:
        alpha = values[:, :, 3:4]
        levels = np.divide(colour * 255.0, alpha, out=np.zeros_like(colour), where=alpha > 0)
    else:
        levels = colour * 255.0 / top  # one rounding of the exact product: ties are exact, round half to even
    return np.round(levels).clip(0, 255).astype(np.uint8)


def _cmyk_to_rgb(samples: np.ndarray, top: int) -> np.ndarray:
    """CMYK samples (``[H, W, 4]``, 0..``top``) -> ``[H, W, 3]`` uint8 by the naive formula PIL applies to
    8-bit CMYK, ``R = (1 - C)(1 - K)``, here from all the bits of the samples and rounded once:
    ``round(255 (top - c)(top - k) / top^2)`` (exact in float64 for 16 bits; never a tie, top being odd).
    """
    values = samples.astype(np.float64)
    levels = (top - values[:, :, :3]) * (top - values[:, :, 3:4]) * 255.0 / (top * top)
    return np.round(levels).astype(np.uint8)


# Float samples have no declared range: the one convention read is 0..1 (what float TIFFs and PFMs from
# image tools hold); 0..255, HDR and negative values are refused rather than guessed.
_FLOAT_RULE = "0..1 scaled to 0..255"


def _float_grey(values: np.ndarray, white: bool) -> np.ndarray:
    """Floating-point greyscale in [0, 1] -> ``[H, W, 3]`` uint8, ``round(255 v)`` (``round(255 (1 - v))``
    when 0 is white); other values raise ValueError (one line)."""
    if not np.isfinite(values).all():
        raise ValueError("floating-point greyscale with NaN or infinite values (only 0..1 is read)")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"floating-point greyscale from {values.min():g} to {values.max():g}: only 0..1 is "
                         f"read (the range is not declared); convert it to 8 or 16 bits, or to 0..1")
    return _to_eight_bits(1.0 - values if white else values, 1)


def _to_rgb_uint8(image: Image.Image, maxval: int | None = None) -> np.ndarray:
    """Any loaded PIL image -> [H, W, 3] uint8 (16-bit greyscale rescaled, alpha dropped); ``maxval``: a
    PGM's (``_netpbm_maxval``, read before loading). Float and declared-range TIFF greyscale are read before
    this (``_decode_with_pil``)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale PNG or TIFF: map 0..65535 to 0..255 (PIL's convert("L") would clip instead).
        return _to_eight_bits(np.asarray(image), 65535)
    if image.mode == "I" and maxval is not None:
        # 16-bit PGM left to PIL's decoders (plain text, or binary with maxval 65535): they store
        # round(v * 65535 / maxval), from which v comes back exactly (the error, at most
        # 0.5 * maxval / 65535, is below 0.5)
        stored = np.round(np.asarray(image, dtype=np.float64) * (maxval / 65535.0))
        return _to_eight_bits(stored, maxval)
    if image.mode == "I":
        # no format in IMAGE_EXTENSIONS but TIFF and PGM (read above) gives this; the range is unknown
        raise ValueError("32-bit integer greyscale without a declared range (not read: it would be a guess)")
    if image.mode == "RGB":
        return np.array(image, dtype=np.uint8)
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1 ...: PIL knows how to reach RGB; alpha is simply dropped.
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"), dtype=np.uint8)


def decode_image(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """``read_image`` that also says what the conversion to 8-bit RGB changed (None: nothing), e.g.
    ``"RGBA, alpha dropped"``, ``"16-bit greyscale"`` or ``"EXIF orientation applied"``, for the tools to
    report. ``max_pixels`` (None: PIL's limit only) is checked from the header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with _open_checked(path, max_pixels) as image:
            conversion = describe_conversion(image)
            # Pillow turns a TIFF itself while loading it and then deletes the tag: it is read first
            orientation = image.tag_v2.get(ORIENTATION_TAG, 1) if image.format == "TIFF" else None
            array = _planar_tiff(path, image)
            if array is not None:  # read by tifffile, as stored: still to be turned
                to_turn = orientation
                top = 65535 if array.dtype == np.uint16 else 255
                array = (_cmyk_to_rgb(array, top) if image.mode == "CMYK" else
                         _to_eight_bits(array, top, 1 in _tiff_tuple(image, _EXTRA_SAMPLES)))
            else:
                array = _decode_with_pil(path, image, max_pixels)
                if orientation is None:
                    orientation = to_turn = image.getexif().get(ORIENTATION_TAG, 1)
                else:
                    to_turn = 1
        if to_turn in range(2, 9):  # 1: as stored; anything else is not an orientation
            array = _orient(array, to_turn)
        if orientation in range(2, 9):
            applied = f"EXIF orientation {orientation} applied"
            conversion = applied if conversion is None else f"{conversion}, {applied}"
        return array, conversion
    except UnidentifiedImageError as error:
        why = _undecodable_tiff(path) or "not an image format PIL can decode"
        raise UserInputError(f"cannot read image {path}: {why}") from error
    except Image.DecompressionBombError as error:
        raise UserInputError(f"cannot read image {path}: {one_line(error)}") from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(f"cannot read image {path}: {one_line(error)}") from error


ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
_SAMPLE_KINDS = {1: "unsigned integers", 2: "signed integers", 3: "floating-point numbers"}


def _undecodable_tiff(path: Path) -> str | None:
    """For a file PIL could not open: when it is a TIFF, its sample layout (PIL opens only some bit depths,
    e.g. 12-bit greyscale but not 10, 14, or 12-bit RGB, nor 64-bit float), so the refusal says what to
    convert; None for other files and for TIFFs whose first directory cannot be read."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            if head[:4] not in (b"II*\0", b"MM\0*"):
                return None
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head)
            file.seek(ifd.next)
            ifd.load(file)
    except Exception:  # a damaged directory: the generic message will do
        return None

    def first(tag: int, default: int) -> int:  # a tag's first value (PIL gives tuples for most)
        value = ifd.get(tag, default)
        return int(value[0] if isinstance(value, tuple) and value else value)
    samples, bits = first(277, 1), first(_BITS_PER_SAMPLE, 1)
    kind = _SAMPLE_KINDS.get(first(_SAMPLE_FORMAT, 1), "samples of an unknown format")
    return (f"a TIFF that PIL cannot decode ({samples} sample(s) per pixel, {bits}-bit {kind}, Photometric "
            f"{first(_PHOTOMETRIC, -1)}); convert it to 8 or 16 bits per sample")


def _decode_with_pil(path: Path, image: Image.Image, max_pixels: int | None) -> np.ndarray:
    """``image`` (opened, not loaded) decoded by PIL -> ``[H, W, 3]`` uint8."""
    maxval = _netpbm_maxval(image)
    stored = _keep_netpbm_samples(image)
    premultiplied = _keep_premultiplied(image)
    declared = _declared_grey(image)
    if image.format == "TIFF":
        # libtiff (compressed TIFFs) hands over samples in this machine's byte order, yet PIL keeps the file's
        # for signed and float grey (not for unsigned 16-bit): big-endian ones came out byte-swapped
        native = _LIBTIFF_NATIVE.get(_tile_rawmode(image))
        if native is not None:
            image.tile = [_with_rawmode(tile, native) if tile[0] == "libtiff" else tile for tile in image.tile]
    # 0 is white: PIL inverts only 8-bit unsigned such files (raw mode L;I), not 16-bit, signed or float ones
    white = image.format == "TIFF" and image.tag_v2.get(_PHOTOMETRIC) == 0 and image.mode != "L"
    rawmode = _tile_rawmode(image)  # loading clears the tiles
    image.load()
    sixteen = _sixteen_bit_rgb(path, image, rawmode, max_pixels)
    if sixteen is not None:
        if image.mode == "CMYK":
            return _cmyk_to_rgb(sixteen, 65535)
        return _to_eight_bits(sixteen, maxval or 65535, premultiplied)
    if premultiplied or stored:
        return _to_eight_bits(np.asarray(image), maxval or 255, premultiplied)
    if declared is not None:
        lowest, highest, _ = declared
        values = np.asarray(image)
        if image.mode == "L":  # signed 8-bit: PIL keeps the bytes
            values = values.view(np.int8)
        elif image.mode == "I" and lowest == 0:  # unsigned 32-bit: PIL's I;32N stores them as int32
            values = values.view(np.uint32)
        values = values.astype(np.int64)
        return _to_eight_bits(highest - values if white else values - lowest, highest - lowest)
    if image.mode == "F":
        return _float_grey(np.asarray(image, dtype=np.float64), white)
    return _to_rgb_uint8(image, maxval)


def _keep_netpbm_samples(image: Image.Image) -> bool:
    """For a binary PGM/PPM whose maxval is not 255 (not loaded yet): have PIL's raw decoder keep the
    stored samples (``_to_eight_bits`` scales them), and return True; False for other images.

    PIL's own decoder for these files rescales every sample in a Python loop (seconds per megapixel).
    """
    tile = getattr(image, "tile", None) or []
    if image.format != "PPM" or len(tile) != 1 or tile[0][0] != "ppm" or image.mode not in ("L", "I", "RGB"):
        return False
    maxval = _netpbm_maxval(image) or 0
    rawmode = {"L": "L", "I": "I;16B", "RGB": "RGB;16B" if maxval > 255 else "RGB"}[image.mode]
    raw = ("raw", tile[0][1], tile[0][2], (rawmode, 0, 1))
    image.tile = [type(tile[0])(*raw) if hasattr(tile[0], "_fields") else raw]  # ImageFile._Tile, or a tuple
    return True


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` turned as EXIF ``orientation`` says (``ImageOps.exif_transpose`` on the decoded pixels)."""
    image = Image.fromarray(array)
    image.getexif()[ORIENTATION_TAG] = orientation  # getexif() caches what it returns: exif_transpose reads it
    return np.asarray(ImageOps.exif_transpose(image))


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (header only) with the size checked against ``max_pixels`` before anything is decoded.
    PIL's own bomb check (twice its ``MAX_IMAGE_PIXELS``) raises ``DecompressionBombError``; it is raised
    here, only while opening, when the caller's limit is above it."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit says it, as one line
        if max_pixels is not None and pil_limit is not None and max_pixels > 2 * pil_limit:
            with _PIL_LIMIT_LOCK:
                Image.MAX_IMAGE_PIXELS = max_pixels
                try:
                    image = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = pil_limit
        else:
            image = Image.open(path)
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise UserInputError(f"image {path} is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the "
                             f"limit of {max_pixels / 1e6:g} Mpx (not decoded)")
    return image
