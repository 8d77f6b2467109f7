"""HTTP body compression: requests inflated under a size limit, answers compressed when the client asks.

A request with `Content-Encoding: gzip|deflate` is inflated before decoding, and no further
than --max-request-bytes (a decompression bomb is a 413, like a long body). An inference
answer (or the metrics page) goes out compressed when `Accept-Encoding` allows gzip or
deflate and the body is large enough to gain from it; uncompressed answers keep the
zero-copy path.
"""

from __future__ import annotations

import asyncio
import functools
import zlib

from conveyor.errors import InvalidInput
from conveyor.server.responses import Response

# A body under this size fits in one packet either way, and compressing it costs more
# than it saves: requests, httpx and aiohttp ask for gzip on every request by default.
MIN_COMPRESSED_BODY_BYTES = 1024
# Above this size the body is compressed on a worker thread (zlib releases the GIL),
# so that one large answer does not stall every other connection of the event loop.
COMPRESS_OFF_LOOP_BYTES = 256 * 1024
# zlib's fastest level: most of the gain on JSON and about twice the speed of the default.
_COMPRESSION_LEVEL = 1


class BodyTooLarge(Exception):
    """A compressed body that inflates past --max-request-bytes (answered 413, like a long one)."""


def decompress(headers: dict[bytes, bytes], body: bytes, limit: int) -> bytes:
    encoding = headers.get(b"content-encoding", b"identity").lower()
    if encoding in (b"identity", b""):
        return body
    if encoding not in (b"gzip", b"deflate"):
        raise InvalidInput(f"Content-Encoding '{encoding.decode('latin-1')}' is not supported (use gzip or deflate)")
    wbits = 31 if encoding == b"gzip" else 15
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding.decode()} data: {exc}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise BodyTooLarge(f"decompressed request body is over the limit of {limit} bytes (--max-request-bytes)")
    return data


@functools.lru_cache(maxsize=64)  # clients send the same few values on every request
def accepted_compression(accept_encoding: bytes) -> bytes | None:
    """b"gzip" or b"deflate", whichever an Accept-Encoding value rates higher (gzip on a tie), or None.

    Codings are rated by their q-values (1 when absent); "*" rates those not named, "x-gzip"
    is gzip, and q=0 refuses a coding.
    """
    ratings: dict[bytes, float] = {}
    for item in accept_encoding.lower().split(b","):
        coding, *parameters = item.split(b";")
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition(b"=")
            if key.strip() == b"q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        coding = coding.strip()
        ratings[b"gzip" if coding == b"x-gzip" else coding] = quality
    wildcard = ratings.get(b"*", 0.0)
    chosen, best = None, 0.0
    for coding in (b"gzip", b"deflate"):
        quality = ratings.get(coding, wildcard)
        if quality > best:
            chosen, best = coding, quality
    return chosen


async def compress(response: Response, accept_encoding: bytes) -> None:
    """Compress `response`'s body in place when the client accepts gzip or deflate and it is worth it."""
    response.headers.append(b"Vary: Accept-Encoding")  # the body depends on the header
    size = sum(len(part) if isinstance(part, bytes) else part.nbytes for part in response.body)
    if size < MIN_COMPRESSED_BODY_BYTES:  # most answers: the header is not even read
        return
    encoding = accepted_compression(accept_encoding)
    if encoding is None:
        return
    if size >= COMPRESS_OFF_LOOP_BYTES:
        compressed = await asyncio.to_thread(_compressed_body, response.body, encoding)
    else:
        compressed = _compressed_body(response.body, encoding)
    response.body = [compressed]
    response.headers.append(b"Content-Encoding: " + encoding)


def _compressed_body(parts: list[bytes | memoryview], encoding: bytes) -> bytes:
    # HTTP's "deflate" is the zlib format (wbits 15); gzip adds its own header and trailer (wbits 31).
    compressor = zlib.compressobj(_COMPRESSION_LEVEL, zlib.DEFLATED, 31 if encoding == b"gzip" else 15)
    chunks = [compressor.compress(part) for part in parts]
    chunks.append(compressor.flush())
    return b"".join(chunks)
