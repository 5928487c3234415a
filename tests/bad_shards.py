"""Shards with damaged samples, for the loader tests."""

import io
import json

import webdataset as wds
from PIL import Image


def shard_with_corrupt_images(path, count: int, colour=(200, 30, 30), caption="a red square on the left.") -> str:
    """A tar of `count` samples whose every third image (j % 3 == 1) is cut short; returns its path."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    png, meta = buf.getvalue(), json.dumps({"caption": caption}).encode()
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for j in range(count):
            w.write({"__key__": f"x{j}", "png": png[:60] if j % 3 == 1 else png, "json": meta})
    return str(path)
