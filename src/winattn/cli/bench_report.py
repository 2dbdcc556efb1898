"""Markdown tables and the scaling plot of a ``winattn bench`` run."""

from __future__ import annotations

import math
from pathlib import Path

from .bench_cases import SHORT


def _paths(peaks: dict, dtype: str) -> str:
    """``" (BLAS x, oneDNN y)"`` when the run recorded both paths (runs before that did not)."""
    names = [("BLAS", f"{dtype}_blas"), ("oneDNN", f"{dtype}_onednn")]
    parts = [f"{label} {peaks[key]:.0f}" for label, key in names if key in peaks]
    return f" ({', '.join(parts)})" if parts else ""


def _mib(memory: dict, key: str) -> str:
    """A memory cell: MiB, or "-" where it was not measured (``--no-memory``, or a failed
    subprocess)."""
    value = memory.get(key)
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def format_ratio(stats: dict) -> str:
    """The ratio of medians, then the per-round ratios' median and interquartile range
    (results recorded before those were kept have none)."""
    ratio = f"{stats['speedup_of_winattn']:.2f}x"
    quartiles = stats.get("round_ratios")
    if not quartiles or stats["speedup_of_winattn"] == 1.0 and quartiles[0] == quartiles[2]:
        return ratio
    low, middle, high = quartiles
    return f"{ratio} (rounds {middle:.2f}, {low:.2f}-{high:.2f})"


#: A change of the measured matmul peak between the start and the end of a run above which the
#: report says the host's speed moved during it.
PEAK_DRIFT = 0.10


def peak_drift(results: dict) -> str | None:
    """A line for the report when the matmul peak measured at the end of the run differs from
    the start's by more than :data:`PEAK_DRIFT` in either dtype (another tenant of a shared
    host, a frequency change), or None. Runs recorded before the end's peak was kept give
    None."""
    start, end = results.get("peak_gflops_start"), results.get("peak_gflops_end")
    if not start or not end:
        return None
    moved = {
        dtype: end[dtype] / start[dtype] - 1
        for dtype in ("fp32", "bf16")
        if start.get(dtype) and end.get(dtype)
    }
    if all(abs(change) <= PEAK_DRIFT for change in moved.values()):
        return None
    parts = ", ".join(
        f"{dtype} {start[dtype]:.0f} -> {end[dtype]:.0f} GFLOP/s ({100 * change:+.0f}%)"
        for dtype, change in moved.items()
    )
    return (
        f"- **the host's speed moved during the run**: matmul peak at start -> end {parts}; "
        "absolute times and the 'of peak' column are less reliable than the ratios, which "
        "compare calls made in the same rounds"
    )


def write_markdown(results: dict, path: Path) -> str:
    m, v = results["machine"], results["versions"]
    lines = [
        "# winattn benchmark",
        "",
        f"- machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch threads "
        f"{m['torch_threads']}, ISA {', '.join(m['isa'])}",
        *([] if "winattn_cpu_kernel" not in m else [
            "- winattn's CPU kernel for small windows (docs/fast-path.md, item 16): "
            + ("in use where it serves" if m["winattn_cpu_kernel"]
               else "not available, SDPA serves")
        ]),
        f"- load average at start / end: {tuple(round(x, 2) for x in m['load_average'])} / "
        f"{tuple(round(x, 2) for x in m.get('load_average_end', ()))}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- commit: {results['commit']}",
        f"- command: `{results['command']}` (preset {results['preset']})",
        "- measured matmul peak (2048^3, best of 8, start and end of the run, the faster of "
        f"BLAS and oneDNN): fp32 {results['peak_gflops']['fp32']:.1f} GFLOP/s"
        f"{_paths(results['peak_gflops'], 'fp32')}, bf16 "
        f"{results['peak_gflops']['bf16']:.1f} GFLOP/s{_paths(results['peak_gflops'], 'bf16')}; "
        "copy bandwidth "
        f"{results['copy_gbps']:.1f} GB/s (read + write)",
        "- GFLOP/s: the model's nominal FLOPs (PyTorch's FLOP counter on timm's model) over the "
        "median time; 'of peak' divides by the measured matmul peak of that dtype",
        "- ratios: a peer's median time over winattn's, in the same process, the libraries "
        "taking turns call by call in a balanced order (above 1: winattn is faster); in "
        "brackets the ratios round by round (a peer's time over winattn's in the same round): "
        "their median and interquartile range, how far the ratio moved between rounds. Where "
        "the host's speed drifts during a run the two medians part",
        "",
    ]
    drift = peak_drift(results)
    if drift:
        lines.insert(-1, drift)
    for note in results.get("notes", []):
        lines.append(f"- note: {note}")
    if results.get("inference"):
        lines += [f"## Inference ({_sizes(results['inference'])}, logits)", "",
                  "| model | batch | dtype | library | median ms | ratio | GFLOP/s | of peak | parity |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in results["inference"]:
            for name, s in row["peers"].items():
                par = row["parity"].get(name, {})
                check = "-" if name == "winattn" else ("ok" if par.get("ok") else par.get("why", "?"))
                lines.append(
                    f"| {SHORT.get(row['model'], row['model'])} | {row['batch']} | {row['dtype']} | "
                    f"{name} | {s['median_ms']:.1f} | {format_ratio(s)} | {s['gflops']:.1f} | "
                    f"{100 * s['utilisation']:.0f}% | {check} |")
        lines.append("")
    if results.get("training"):
        lines += [f"## Training step (forward, backward, AdamW; batch 8, "
                  f"{_sizes(results['training'])})", "",
                  "Activation memory: bytes autograd saves for backward in one forward (parameters "
                  "excluded). Peak RSS: a fresh process building the model and running two steps "
                  "(`MALLOC_MMAP_THRESHOLD_=65536`; VmHWM, reset after building); 'over "
                  "baseline' subtracts its RSS after building the model and optimizer (so it "
                  "holds activations, gradients, AdamW state).", "",
                  "| model | dtype | library | median ms | ratio | activations MiB | peak RSS MiB | over baseline MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in results["training"]:
            for name, s in row["peers"].items():
                mem = s.get("memory", {})
                lines.append(
                    f"| {SHORT.get(row['model'], row['model'])} | {row['dtype']} | {name} | "
                    f"{s['median_ms']:.0f} | {format_ratio(s)} | {s['activation_mib']:.0f} | "
                    f"{_mib(mem, 'peak_rss_mib')} | {_mib(mem, 'peak_over_baseline_mib')} |")
        lines.append("")
    if results.get("features"):
        lines += ["## Feature extraction (forward_features, batch 1, float32)", "",
                  "| resolution | library | median ms | ratio | peak RSS over baseline MiB | max diff vs timm |",
                  "|---|---|---|---|---|---|"]
        for row in results["features"]:
            for name, s in row["peers"].items():
                mem = s.get("memory", {})
                diff = "-" if name == "winattn" else (
                    f"{row['max_abs_diff']:.1e}" + ("" if row["same_function"] else
                                                  " (padding differs by design)"))
                lines.append(
                    f"| {row['resolution']}x{row['resolution']} | {name} | {s['median_ms']:.0f} | "
                    f"{format_ratio(s)} | {_mib(mem, 'peak_over_baseline_mib')} | {diff} |")
        lines.append("")
    if results.get("operator"):
        lines += ["## The operator alone (batch 8, window 7, shift 3, bias; head_dim 32)", "",
                  "`winattn`: `window_attention` on grid-layout q, k, v (gathers in and out); "
                  "`winattn window-order + block gather`: what a Swin block runs, the one row "
                  "gather that moves its tokens (B, L, heads * d) from the plain windows' order "
                  "to the shifted ones', then the stage-internal call on q, k, v in window "
                  "order (`attend_qkv`: winattn's CPU kernel where it serves, with a compact "
                  "mask, as the model keeps it; else SDPA with the mask expanded to the batch; "
                  "float32, and bf16 on CPUs with AMX); "
                  "`..., matmuls`: the same through two bf16 matmuls around a float32 softmax "
                  "(what bf16 runs on CPUs without AMX); `roll/partition/matmul`: the peers' "
                  "path; `SDPA dense mask`: one SDPA over the whole grid with a dense additive "
                  "mask. Every path's output, in grid order, is checked against the peers' "
                  "before timing.", "",
                  "| stage | dtype | path | median ms | ratio | GFLOP/s (useful) |",
                  "|---|---|---|---|---|---|"]
        for row in results["operator"]:
            for name, s in row["peers"].items():
                lines.append(f"| {row['stage']} {tuple(row['shape'])} | {row['dtype']} | {name} | "
                             f"{s['median_ms']:.2f} | {format_ratio(s)} | {s['gflops']:.1f} |")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_plot(results: dict, path: Path) -> bool:
    """Time and memory of forward_features against pixels, log-log, one line per library.
    Returns False, writing nothing, where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["features"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name in rows[0]["peers"]:
        pixels = [r["pixels"] for r in rows]
        ax_t.plot(pixels, [r["peers"][name]["median_ms"] for r in rows], "o-", label=name)
        mem = [r["peers"][name].get("memory", {}).get("peak_over_baseline_mib") for r in rows]
        if all(x is not None for x in mem):
            ax_m.plot(pixels, mem, "o-", label=name)
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak RSS over baseline (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (side^2)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{SHORT.get(rows[0]['model'], rows[0]['model'])} forward_features, batch 1, "
                 f"float32; {results['machine']['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _sizes(rows: list[dict]) -> str:
    """The input sizes of ``rows``: "224x224", or "224x224 / 256x256" with V2 models."""
    sizes = sorted({row.get("size", 224) for row in rows})
    return " / ".join(f"{size}x{size}" for size in sizes)
