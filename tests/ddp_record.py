"""``python tests/ddp_record.py RECORD_DIR train ...``: run the vitkit CLI and write the training-set keys
``(index, epoch)`` this process loaded, in order, to ``RECORD_DIR/rank<RANK>.json``. test_ddp.py uses it as the
torchrun entry point (and for the one-process run) to see which samples each process trained on; evaluation loads
(integer keys, rank 0 only) are not recorded."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vitkit.cli.main import main
from vitkit.data.transforms import TransformDataset


def record_training_keys(keys: list) -> None:
    load = TransformDataset.__getitem__

    def getitem(self, key):
        if isinstance(key, tuple):  # the training sampler keys items (index, epoch); eval loaders use ints
            keys.append(list(key))
        return load(self, key)

    TransformDataset.__getitem__ = getitem


if __name__ == "__main__":
    out, keys = Path(sys.argv[1]), []
    record_training_keys(keys)
    try:
        code = main(sys.argv[2:])
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(keys))
    sys.exit(code)
