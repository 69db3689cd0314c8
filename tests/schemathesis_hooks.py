"""Generators schemathesis cannot derive from the OpenAPI document.

A JSON schema can say that `image` is base64 text (format `image-base64`) or
a file part (`image/png` in the multipart encoding), but not that its bytes
decode as a picture; random bytes are rightly refused by the server, which
would fail the positive-data check for no fault of the schema. These
strategies make real PNG stills (16, the engine's smallest, to 64 pixels a side, random colours) for
both, so that every positive request schemathesis sends is one the server
must accept. Loaded through SCHEMATHESIS_HOOKS by tests/serve.rs.
"""

import base64
import struct
import zlib

import schemathesis
from hypothesis import strategies as st


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width  # filter type 0, then RGB8 pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


stills = st.builds(
    png,
    st.integers(16, 64),
    st.integers(16, 64),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
)

schemathesis.openapi.format("image-base64", stills.map(lambda b: base64.b64encode(b).decode()))
schemathesis.openapi.media_type("image/png", stills)


@schemathesis.hook
def before_call(context, case, kwargs):
    # schemathesis 4's coverage phase, once a multipart part has a media-type
    # strategy (the still above), sends every other required part as an empty
    # string and still counts the request as schema-valid; an empty `recipe` is
    # not the JSON object the document asks for. Send the smallest one it allows.
    if isinstance(case.body, dict) and case.body.get("recipe") == "":
        case.body = {**case.body, "recipe": {"prompt": "a still coming to life"}}

    # `aspect` with `width` or `height` (or the model's pixel count) gives a
    # size the server bounds after resolving it (400 naming `aspect` beyond
    # 1024 a side), a rule across fields that a JSON schema cannot state: the
    # positive requests leave `aspect` out.
    for body in (case.body, case.body.get("recipe") if isinstance(case.body, dict) else None):
        if isinstance(body, dict):
            body.pop("aspect", None)

    # `last_image` is taken only by a first-last-frame model, which the test
    # server does not have (400 naming `last_image`): another rule across
    # fields and models, so the positive requests leave it out.
    if isinstance(case.body, dict):
        case.body.pop("last_image", None)
