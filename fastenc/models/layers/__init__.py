"""Building blocks shared by the vision and text towers: `attention` (backends, `Attention`) and `block`.

Nothing is re-exported here on purpose: a function named `attention` would shadow the `attention` submodule.
"""
