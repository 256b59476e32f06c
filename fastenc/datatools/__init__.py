"""Offline data tools: make and check shard sets before training (the `fastenc data` commands).

    synth     synthetic study data with known attributes (shapes, colors, styles, words)
    ingest    an image folder or img2dataset output -> validated webdataset shards, DALI indexes, manifest.json
    inspect   counts, size and caption statistics and a contact sheet of a shard set

They write shards in the format the runtime pipeline (fastenc.data) reads, and index them with fastenc.data.index,
which training uses too. Importing this package loads nothing; its modules need torch, numpy and Pillow.
"""


class DataToolError(Exception):
    """A problem with the user's input or options; the message says what to fix (the CLI exits with 2)."""
