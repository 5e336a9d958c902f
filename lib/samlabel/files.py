"""Files written whole or not at all: a reader (or a restart after a kill) sees the old or the new
content, never a part. Plain Python: the GPU check and the training process use it too."""

import os
import shutil
import tempfile

TEMP_SUFFIX = ".part"  # matches none of the datastore's extensions, so MONAI Label's reconcile never lists it


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def atomic_write(dest: str, source_path: str = None, data: bytes = None) -> None:
    """Write a file's bytes (or ``data``) to ``dest`` via a temporary file in its folder + fsync + os.replace."""
    folder = os.path.dirname(dest)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            if source_path is not None:
                with open(source_path, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
            else:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes 0600; the files MONAI Label writes are world-readable
        os.replace(temp, dest)
    except BaseException:
        try:
            os.remove(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
