"""Put on PYTHONPATH by a test: in the process that is rank 1 of a torchrun job, every read of
a training image fails with EIO, as on a machine whose disk (or network mount) broke."""

import errno
import os

if os.environ.get("RANK") == "1":
    from visiontune.data import folder

    def _broken_read(self, path):
        if f"{os.sep}train{os.sep}" in str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return path

    folder.ImageDataset.read = _broken_read
