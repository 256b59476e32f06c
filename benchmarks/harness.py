"""Shared harness of the benchmark scripts: environment fields, CSV rows, robust statistics, CPU-interference
monitor and bar charts made from the CSV.

Every benchmark appends rows to a CSV under benchmarks/results/ (never rewrites history) and draws its PNG from
that CSV, so a plot can always be regenerated from the data it shows. A row carries the hardware (no hostname),
library versions and the git revision of the checkout, suffixed "-dirty" when files outside benchmarks/results/
differ from the commit.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import sys
import tempfile
import time
from typing import Callable, Iterable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


# ----------------------------------------------------------------------------------------------------------------
# environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow), not os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_revision(repo: str = REPO_ROOT) -> str:
    """Short HEAD hash, "-dirty" if anything outside benchmarks/results/ differs from it (fastenc.utils.provenance)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from fastenc.utils.provenance import git_revision as revision

    return revision(repo)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return ""


def env_fields(extra_packages: Sequence[str] = ()) -> dict:
    """Row fields describing where a measurement ran: hardware (no hostname), versions, git revision."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    fields = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "git_rev": git_revision(),
    }
    for pkg in extra_packages:
        fields[pkg.replace("-", "_")] = _version(pkg)
    return fields


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------------------
# CSV


def append_rows(csv_path: str, rows: Iterable[dict]) -> None:
    """Append dict rows to csv_path, creating it with a header if needed.

    Column order is stable: existing columns keep their place, new keys are appended at the end (in the order
    they first appear) and the file is rewritten once with the wider header, old rows getting empty cells. The
    write goes to a temporary file renamed into place, so an interrupted run never leaves a truncated CSV.
    """
    rows = [dict(r) for r in rows]
    if not rows:
        return
    header: list[str] = []
    old_rows: list[dict] = []
    if os.path.exists(csv_path) and os.path.getsize(csv_path) > 0:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old_rows = list(reader)
    for row in rows:
        for key in row:
            if key not in header:
                header.append(key)
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(csv_path)), suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="raise")
            writer.writeheader()
            writer.writerows(old_rows)
            writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        os.replace(tmp, csv_path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def read_rows(csv_path: str) -> list[dict]:
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def spread(values: Sequence[float]) -> dict:
    """{median, p10, p90, iqr, n} of values: medians resist the odd slow step that a mean would smear in."""
    return {
        "median": median(values),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
        "iqr": percentile(values, 75) - percentile(values, 25),
        "n": len(values),
    }


# ----------------------------------------------------------------------------------------------------------------
# interference: how much CPU did *other* processes use while we measured?


def _proc_tree_cpu_s(pid: int) -> float:
    """CPU seconds of pid and its live descendants, plus the reaped children accumulated in cutime/cstime."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(name)
        stats[p] = fields
        children.setdefault(int(fields[1]), []).append(p)  # fields[1] is ppid (fields start after the comm)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            f = stats[p]
            # utime stime cutime cstime are fields 14-17 of /proc/pid/stat, i.e. 11-14 after the comm.
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo.extend(children.get(p, []))
    return total / tick


def _system_busy_s() -> float:
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    guest = sum(vals[8:10]) if len(vals) > 9 else 0  # guest time is already counted in user
    return (sum(vals) - idle - guest) / tick


def busy_cores(window_s: float = 3.0) -> float:
    """Cores the whole machine kept busy over the next window_s seconds (call it while this process idles)."""
    b0, t0 = _system_busy_s(), time.perf_counter()
    time.sleep(window_s)
    return (_system_busy_s() - b0) / (time.perf_counter() - t0)


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.3, window_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until other processes use under threshold_cores; returns the last reading.

    On a shared 2-core machine a test suite running next door halves a benchmark's speed, so measurements start
    only once the machine is quiet, and the reading goes into the CSV either way."""
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            busy = busy_cores(window_s)
        except OSError:
            return float("nan")
        if busy < threshold_cores or time.monotonic() >= deadline:
            if busy >= threshold_cores:
                print(f"harness: machine still busy ({busy:.2f} cores used by others) after {max_wait_s:.0f} s; "
                      "measuring anyway", file=sys.stderr, flush=True)
            return busy
        print(f"harness: other processes use {busy:.2f} cores; waiting for an idle machine", file=sys.stderr,
              flush=True)


class CpuMonitor:
    """Context manager: wall time, 1-min load average at start and end, and the CPU (in cores) that processes
    outside this process tree used meanwhile. Our own run loads the machine, so the load average alone cannot
    say whether someone else did; `foreign_cores` can (0 = we had the machine alone). Linux only; elsewhere the
    fields are NaN."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        try:
            self.own0, self.sys0 = _proc_tree_cpu_s(os.getpid()), _system_busy_s()
        except OSError:
            self.own0 = self.sys0 = None
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.t0
        self.load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        self.own_cores = self.foreign_cores = float("nan")
        if self.own0 is not None:
            own = _proc_tree_cpu_s(os.getpid()) - self.own0
            busy = _system_busy_s() - self.sys0
            self.own_cores = own / self.wall_s
            self.foreign_cores = max(0.0, busy - own) / self.wall_s
        return False

    def fields(self) -> dict:
        return {"load1_start": self.load_start, "load1_end": self.load_end, "own_cpu_cores": self.own_cores,
                "foreign_cpu_cores": self.foreign_cores, "wall_s": self.wall_s}


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status ("VmHWM", "VmRSS") in MiB; NaN where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MiB (VmHWM; NaN where /proc is missing).

    Not getrusage's ru_maxrss: that survives execve, so a subprocess spawned by a big parent reports the parent's."""
    return _proc_status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident size now in MiB (VmRSS; NaN where /proc is missing)."""
    return _proc_status_mb("VmRSS")


# ----------------------------------------------------------------------------------------------------------------
# plots


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def latest_by(rows: list[dict], key: Callable[[dict], object]) -> list[dict]:
    """The last row for each key value, in order of first appearance: the CSV keeps history, plots show now."""
    last: dict = {}
    for r in rows:
        last[key(r)] = r
    return list(last.values())


def plot_from_csv(csv_path: str, out_path: str, panels: list[dict], where: Callable[[dict], bool] | None = None,
                  label: Callable[[dict], str] | None = None, title: str | None = None) -> str | None:
    """Bar charts (matplotlib Agg) from the latest row per label of csv_path, one subplot per panel.

    panels: dicts with
      "y": column of bar heights, optional "err": (low column, high column) drawn as an error bar; or
      "stack": [columns] for stacked bars (with "stack_labels"), optional "total": a column drawn as a marker;
      "ylabel", "title", optional "where": a row filter for this panel only, optional "color": row -> color.
    label(row) names a bar (default: impl/recipe). Returns out_path, or None if no row matched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = label or (lambda r: f"{r.get('impl', '')}\n{r.get('recipe', '')}")
    rows = [r for r in read_rows(csv_path) if where is None or where(r)]
    rows = latest_by(rows, label)
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        prow = [r for r in rows if panel.get("where") is None or panel["where"](r)]
        names = [label(r) for r in prow]
        xs = list(range(len(prow)))
        if "stack" in panel:
            bottom = [0.0] * len(prow)
            for col, lab in zip(panel["stack"], panel.get("stack_labels", panel["stack"])):
                vals = [max(0.0, _float(r.get(col))) for r in prow]
                vals = [0.0 if math.isnan(v) else v for v in vals]
                ax.bar(xs, vals, bottom=bottom, label=lab, width=0.6)
                bottom = [b + v for b, v in zip(bottom, vals)]
            if panel.get("total"):
                ax.plot(xs, [_float(r.get(panel["total"])) for r in prow], "k_", markersize=30, label="step (median)")
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ys = [_float(r.get(panel["y"])) for r in prow]
            yerr = None
            if panel.get("err"):
                lo = [y - _float(r.get(panel["err"][0])) for y, r in zip(ys, prow)]
                hi = [_float(r.get(panel["err"][1])) - y for y, r in zip(ys, prow)]
                yerr = [[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]]
            colors = [panel["color"](r) for r in prow] if panel.get("color") else "tab:blue"
            bars = ax.bar(xs, ys, yerr=yerr, capsize=4, width=0.6, color=colors)
            ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], padding=3, fontsize=8)
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def run_json_subprocess(cmd: Sequence[str], result_path: str, timeout: float) -> dict:
    """Run one measurement in its own process (`cmd` writes its result as JSON to result_path) and return that
    result, or {"error": ...} with the exit status and the output's tail (printed) when it failed or timed out."""
    import json
    import subprocess

    try:
        proc = subprocess.run(list(cmd), timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if os.path.exists(result_path):
        with open(result_path) as f:
            out = json.load(f)
    else:
        out = {"error": f"exit {proc.returncode}: {proc.stdout[-400:]}"}
    if "error" in out:
        print(proc.stdout[-3000:], flush=True)
    return out


def print_table(rows: list[dict], cols: Sequence[str], file=sys.stdout) -> None:
    """A fixed-width table of selected columns (floats to 4 significant digits)."""
    def fmt(v):
        f = _float(v)
        if isinstance(v, str) and math.isnan(f):
            return v if len(v) <= 40 else v[:37] + "..."
        return f"{f:.4g}" if not math.isnan(f) else ""

    cells = [[str(c) for c in cols]] + [[str(fmt(r.get(c, ""))) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(s.rjust(w) for s, w in zip(row, widths)), file=file)
