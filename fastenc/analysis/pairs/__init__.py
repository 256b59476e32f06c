"""Where two encoders disagree: image pairs one encoder calls similar and the other does not.

The comparison of "Data or Language Supervision: What Makes CLIP Better than DINO?": embed the same images with
both encoders (L2-normalized CLS features), draw random image pairs, and look at the pairs that are close under
one encoder and far under the other. "CLIP-high" pairs have cosine > 0.7 under CLIP and < 0.5 under DINO;
"DINO-high" pairs > 0.8 under DINO and < 0.5 under CLIP (a strict variant: 0.9 / 0.5 and 0.95 / 0.2); about 100
of each kind are inspected by eye. The paper finds CLIP pairs sharing object category and written text, DINO
pairs sharing color and visual style. On fastenc's synthetic data every image has known attributes (category,
color, style, word; fastenc.datatools.synth), so the same inspection becomes a number: the fraction of pairs of each
kind whose two images share each attribute, against the fraction among all sampled pairs.

Encoders are "A" and "B" throughout (A = CLIP, B = DINO in the paper, whose thresholds are the defaults):
    A-high / B-low:  cos_a > a_high and cos_b < b_low      (defaults 0.7, 0.5)
    B-high / A-low:  cos_b > b_high and cos_a < a_low      (defaults 0.8, 0.5)
Each side keeps its top `max_pairs` pairs ranked by the gap (cos_a - cos_b for A-high, cos_b - cos_a for B-high);
ties are broken by the smaller pair (i, j), then by the earlier position in the scanned stream, so the kept pairs
and their order are a deterministic function of the pairs scanned, not of chunk sizes.

Memory. Nothing here builds an N x N matrix. Features are used as given (no normalized copy: cosines are the
raw dot products times the rows' inverse norms, an [N] vector per encoder), pairs are scanned in chunks whose
gathered rows take about `chunk_bytes` (16 MiB by default), and the selection keeps a running top-k per side.
With M sampled pairs the memory beyond the input features is at most about 48 * M bytes (sampling; the pair
list kept for the scan is 16 * M) plus two chunks and 16 MiB: `memory_bound_bytes` states the bound term by
term, and benchmarks/bench_pairs.py measures it (N = 100,000 images per encoder, M = 2,000,000 pairs: seconds,
about 100 MiB). `mode="exhaustive"` scans all N (N - 1) / 2 pairs i < j in row blocks instead, for small N
(tests check it against a brute-force N x N matrix).

Outputs of `analyze_pairs(..., out_dir=...)`:
    pairs.json             thresholds, counts, cosine statistics, the kept pairs of each side, attribute sharing
    sharing.md             the counts and the attribute-sharing table in markdown
    pairs_<a>_high.png     the kept A-high pairs, two images side by side each, captioned (with load_image)
    pairs_<b>_high.png     the same for B-high

The package, by concern; data flows down this list and never up (each module imports only modules above it):
    thresholds   the criteria: absolute and quantile cuts, presets, as_thresholds
    sampling     which pairs: uniform random unordered pairs (i, j), i < j
    cosines      the pairs' cosines under both encoders, streamed in chunks of bounded memory
    selection    the streaming top-k of each side (PairSelector, select_pairs)
    sharing      the attribute table and how often a pair set's two images share each attribute
    scan         one pass: cosines -> selection, sharing and cosine statistics (scan_pairs); memory_bound_bytes
    report       the JSON-ready result and its markdown (sharing.md)
    render       the PNG sheets of pairs (render_pairs)
    analyze      analyze_pairs: all of the above, and the files in out_dir
Everything public is importable from fastenc.analysis.pairs.
"""

from fastenc.analysis.pairs.analyze import analyze_pairs
from fastenc.analysis.pairs.cosines import (
    DEFAULT_CHUNK_BYTES,
    check_features,
    inverse_norms,
    iter_pair_cosines,
    pair_cosines,
)
from fastenc.analysis.pairs.render import pair_grid_size, render_pairs
from fastenc.analysis.pairs.report import pairs_result, report_markdown, sharing_markdown
from fastenc.analysis.pairs.sampling import num_unordered_pairs, pairs_from_linear_index, sample_pairs
from fastenc.analysis.pairs.scan import QUANTILE_PAIRS, PairScan, memory_bound_bytes, resolve_quantiles, scan_pairs
from fastenc.analysis.pairs.selection import PairSelection, PairSelector, SideSelection, select_pairs
from fastenc.analysis.pairs.sharing import attribute_sharing, attribute_summary, check_attributes
from fastenc.analysis.pairs.thresholds import (
    PAPER_THRESHOLDS,
    STRICT_THRESHOLDS,
    PairThresholds,
    QuantileThresholds,
    as_thresholds,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES", "PAPER_THRESHOLDS", "QUANTILE_PAIRS", "STRICT_THRESHOLDS", "PairScan", "PairSelection",
    "PairSelector", "PairThresholds", "QuantileThresholds", "SideSelection", "analyze_pairs", "as_thresholds",
    "attribute_sharing", "attribute_summary", "check_attributes", "check_features", "inverse_norms",
    "iter_pair_cosines", "memory_bound_bytes", "num_unordered_pairs", "pair_cosines", "pair_grid_size",
    "pairs_from_linear_index", "pairs_result", "render_pairs", "report_markdown", "resolve_quantiles", "sample_pairs",
    "scan_pairs", "select_pairs", "sharing_markdown",
]
