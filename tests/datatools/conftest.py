"""Fixtures of the data-tool tests: the data tests' synthetic shard set and tar writer."""

from tests.data.conftest import NUM_SYNTH, SYNTH_PER_SHARD, synth_dir, write_tar  # noqa: F401
