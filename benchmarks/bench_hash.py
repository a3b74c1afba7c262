"""How fast resume identity hashes weights and files (hf_astroquant/digests.py): MB/s of the
piecewise digest on an in-memory tensor, of one thread's plain sha256, and of a file's digest.

    python benchmarks/bench_hash.py [--megabytes 512]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hf_astroquant.digests import file_digest, hash_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=512)
    args = parser.parse_args()
    row = hash_speed(args.megabytes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        path.write_bytes(os.urandom(args.megabytes << 20))
        file_digest(path)  # once to warm the page cache, as a resume reads a file it just wrote
        start = time.perf_counter()
        file_digest(path)
        row["file_digest_MBps"] = round(args.megabytes * 1.048576 / (time.perf_counter() - start))
    row["cores"] = os.cpu_count()
    print(json.dumps(row))


if __name__ == "__main__":
    main()
