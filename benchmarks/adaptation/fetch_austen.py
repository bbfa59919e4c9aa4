"""Rebuild austen.txt (the six Jane Austen novels) from Debian's r-cran-janeaustenr, without R.

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb pkg
    pip install rdata
    python benchmarks/adaptation/fetch_austen.py pkg/usr/lib/R/site-library/janeaustenr/data --out austen.txt

The package stores each novel as an R character vector (one element per line of text) inside
Rdata.rdb; Rdata.rdx (gzip) is the index: variable -> (offset, length). Each entry of the .rdb is a
4-byte big-endian length followed by zlib data holding an R serialization stream, which the PyPI
package `rdata` parses. Novels are written in the package's (alphabetical) order, lines joined with
newlines, a blank line between novels.

Feeds docs/benchmarks/central-claim.md, section "The central claim at small scale / Setup (the text it trains on)".
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import warnings
import zlib
from pathlib import Path

EXPECTED_SHA256 = "ae4140c6e5ab543cc81f68358120258f0935ac9e27a30f44a7a564b349307867"  # /work/shared/data/austen.txt


def read_rds(blob: bytes):
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" is expected for raw streams
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help=".../site-library/janeaustenr/data")
    ap.add_argument("--out", type=Path, default=Path("austen.txt"))
    args = ap.parse_args()
    index = read_rds(gzip.decompress((args.data_dir / "Rdata.rdx").read_bytes()))["variables"]
    rdb = (args.data_dir / "Rdata.rdb").read_bytes()
    novels = []
    for name, (offset, length) in index.items():
        entry = rdb[int(offset): int(offset) + int(length)]
        lines = read_rds(zlib.decompress(entry[4:]))  # first 4 bytes: uncompressed length
        novels.append("\n".join(str(x) for x in lines))
        print(f"{name}: {len(lines)} lines")
    text = "\n\n".join(novels)  # a blank line between novels
    args.out.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"wrote {args.out} ({len(text):,} characters), sha256 {digest}"
          + (" (matches the copy used for the benchmarks)" if digest == EXPECTED_SHA256 else ""))


if __name__ == "__main__":
    main()
