"""Where a result came from: the git revision of the code that made it (benchmarks, eval reports)."""

from __future__ import annotations

import os
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_revision(repo: str = REPO_ROOT, ignore: tuple[str, ...] = ("benchmarks/results/",)) -> str:
    """Short HEAD hash, "-dirty" if anything outside the `ignore` prefixes differs from it (untracked files
    included); "unknown" outside a git checkout (an installed package).

    `--no-optional-locks` keeps `git status` from refreshing the index: this function never writes to .git.
    FASTENC_GIT_REV, when set, is returned as is: for a copy of the tree whose .git is not the one it came from
    (the GPU machine gets the working tree of a checkout, with a stale .git).
    """
    if os.environ.get("FASTENC_GIT_REV"):
        return os.environ["FASTENC_GIT_REV"]
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "--no-optional-locks", "-C", repo, "status", "--porcelain"],
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    changed = [p for p in changed if not p.strip('"').startswith(ignore)]
    return rev + ("-dirty" if changed else "")
