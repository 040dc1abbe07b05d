"""The storage format of every dataset the harness reads: WebDataset-style tar shards plus a manifest.

``manifest`` (what a set holds, naming rules), ``tarformat`` (headers written and parsed directly),
``writer`` (building a set), ``reader`` (the samples of one shard), ``verify`` (a set against its
manifest). Shards stay readable by the ``webdataset`` package.
"""
from robustbench_ft.shards.manifest import MANIFEST_FILE, Manifest, ShardError, ShardInfo
from robustbench_ft.shards.verify import check_shard_files, verify_shards
from robustbench_ft.shards.writer import ShardWriter, encode_image, write_shards

__all__ = ["MANIFEST_FILE", "Manifest", "ShardError", "ShardInfo", "check_shard_files", "verify_shards",
           "ShardWriter", "encode_image", "write_shards"]
