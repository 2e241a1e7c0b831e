"""Writing files so that readers never see a part of one: atomic replace, strict JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write) -> None:
    """``write(f)`` into ``.<name>.tmp`` beside ``path`` (binary), fsync, then rename it over ``path``
    (``os.replace`` is atomic on POSIX): readers see the old file or the complete new one, never a part."""
    atomic_write_all({Path(path): write})


def atomic_write_all(writes: dict[Path, Any]) -> None:
    """``atomic_write`` of several files that belong together: every ``.<name>.tmp`` is written and fsynced
    before the first rename, so a failed write (disk full) leaves all the old files as they were."""
    tmps = {path: path.with_name(f".{path.name}.tmp") for path in map(Path, writes)}
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmps[Path(path)], "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as strict JSON, atomically; NaN/inf (an exact reconstruction has PSNR inf) are written as the
    strings "nan"/"inf"/"-inf" (bare ``Infinity`` is not JSON), which ``float()`` reads back."""
    text = json.dumps(_finite_floats(data), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def _finite_floats(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _finite_floats(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_floats(v) for v in data]
    return data
