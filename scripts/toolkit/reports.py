"""JSON reports: every stage writes one next to its output; later stages read them."""

import hashlib
import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path, payload) -> Path:
    """Write `payload` as indented UTF-8 JSON via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2, ensure_ascii=False, default=str)
        stream.write("\n")
    os.chmod(temporary, 0o644)  # mkstemp creates 0600; reports are for everyone to read
    os.replace(temporary, path)
    return path


def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error


def sha256_of(path, progress=None) -> str:
    """sha256 of a file, read in 1 MiB blocks (a tqdm `progress` advances by the bytes read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()
