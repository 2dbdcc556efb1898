"""Draw, for every pattern of the local-attention family, the keys one query sees: a query near
a border and one in the middle. Writes small PNGs next to this file.

The pictures are measured from the operators themselves, not drawn from a description: with
q = k = 0 every visible key gets the same logit, and with v = one-hot per grid token the output
of a query is its attention weight on every key. Shifted windows give keys of another shift
region a weight of e^-100 of the others': drawn as not seen.

    PYTHONPATH=src python docs/family/draw_patterns.py
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import winattn  # noqa: E402

HERE = Path(__file__).resolve().parent
CMAP = ListedColormap(["#f4f4f4", "#5b8def", "#e8553e"])  # unseen, seen, the query


def weights(op, grid: tuple[int, ...], heads: int = 1, num_globals: int = 0) -> torch.Tensor:
    """``(heads, L, L + G)``: attention weight of every query on every key (grid then globals)."""
    tokens = math.prod(grid)
    keys = tokens + num_globals
    zeros = torch.zeros(1, *grid, heads, keys, dtype=torch.float64)
    eye = torch.eye(keys, dtype=torch.float64)[:tokens].view(1, *grid, 1, keys)
    v = eye.expand(1, *grid, heads, keys)
    if num_globals:
        global_k = torch.zeros(1, num_globals, heads, keys, dtype=torch.float64)
        global_v = torch.eye(keys, dtype=torch.float64)[tokens:].view(1, num_globals, 1, keys)
        out = op(zeros, zeros, v, global_k, global_v.expand(1, num_globals, heads, keys))
    else:
        out = op(zeros, zeros, v)
    return out.reshape(tokens, heads, keys).transpose(0, 1)


def seen_map(w: torch.Tensor, query: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Grid-shaped 0/1/2 map: unseen, seen, the query itself."""
    row = w[query, : math.prod(grid)]
    seen = (row > 1e-20).long()
    seen[query] = 2
    return seen.view(grid)


def draw_grid(ax, values: torch.Tensor, title: str) -> None:
    ax.imshow(values.numpy(), cmap=CMAP, vmin=0, vmax=2)
    rows, cols = values.shape
    ax.set_xticks([x - 0.5 for x in range(cols + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(rows + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=8)


def save(fig, name: str) -> None:
    fig.tight_layout()
    path = HERE / name
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")


def flat(grid: tuple[int, ...], *coords: int) -> int:
    index = 0
    for n, c in zip(grid, coords):
        index = index * n + c
    return index


def two_queries_2d(name: str, title: str, op, grid=(12, 12), border=(1, 0), middle=(6, 6)):
    w = weights(op, grid)[0]
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.8))
    for ax, where, label in ((axes[0], border, "near a border"), (axes[1], middle, "middle")):
        draw_grid(ax, seen_map(w, flat(grid, *where), grid), f"query {where} ({label})")
    fig.suptitle(title, fontsize=9)
    save(fig, name)


def main() -> None:
    two_queries_2d(
        "neighborhood.png",
        "neighborhood_attention, kernel 5: the window shifts inwards at the border",
        lambda q, k, v: winattn.neighborhood_attention(q, k, v, 5),
    )
    two_queries_2d(
        "dilated_neighborhood.png",
        "neighborhood_attention, kernel 3, dilation 3 (DiNAT)",
        lambda q, k, v: winattn.neighborhood_attention(q, k, v, 3, dilation=3),
        border=(0, 1),
    )
    two_queries_2d(
        "causal_neighborhood.png",
        "neighborhood_attention, kernel 4, causal on both axes",
        lambda q, k, v: winattn.neighborhood_attention(q, k, v, 4, is_causal=True),
        border=(1, 2),
    )
    two_queries_2d(
        "rectangles.png",
        "window_attention, window (2, 6), shift (1, 3): rectangles",
        lambda q, k, v: winattn.window_attention(q, k, v, (2, 6), shift_size=(1, 3)),
        border=(11, 0),
    )

    # CSWin: heads 0 (vertical stripes) and 1 (horizontal stripes).
    grid = (12, 12)
    w = weights(lambda q, k, v: winattn.cross_shaped_window_attention(q, k, v, 3), grid, heads=2)
    fig, axes = plt.subplots(2, 2, figsize=(5, 5.4))
    for row, (where, label) in enumerate((((1, 0), "near a border"), ((6, 6), "middle"))):
        for head in range(2):
            kind = "heads 1st half: vertical" if head == 0 else "heads 2nd half: horizontal"
            draw_grid(
                axes[row, head],
                seen_map(w[head], flat(grid, *where), grid),
                f"query {where} ({label})\n{kind}",
            )
    fig.suptitle("cross_shaped_window_attention, stripe width 3 (CSWin)", fontsize=9)
    save(fig, "cross_shaped.png")

    # Video Swin: 3-D shifted windows, drawn as time slices.
    grid, window, shift = (4, 8, 8), (2, 4, 4), (1, 2, 2)
    w = weights(lambda q, k, v: winattn.window_attention(q, k, v, window, shift_size=shift), grid)[
        0
    ]
    fig, axes = plt.subplots(2, 4, figsize=(7, 4))
    for row, (where, label) in enumerate((((3, 7, 7), "border"), ((1, 4, 3), "middle"))):
        seen = seen_map(w, flat(grid, *where), grid)
        for t in range(grid[0]):
            draw_grid(axes[row, t], seen[t], f"frame t={t}")
        axes[row, 0].set_ylabel(f"query {where}\n({label})", fontsize=8)
    fig.suptitle("window_attention 3-D, window (2, 4, 4), shift (1, 2, 2) (Video Swin)", fontsize=9)
    save(fig, "video_swin_3d.png")

    # Sequences: one strip per variant and query.
    length = 32
    variants = [
        ("sliding 7", dict(mode="sliding")),
        ("sliding 6 causal + 3 sinks", dict(mode="sliding", is_causal=True, num_sink_tokens=3)),
        ("blocked 8", dict(mode="blocked")),
        ("blocked 8 causal + 3 sinks", dict(mode="blocked", is_causal=True, num_sink_tokens=3)),
    ]
    fig, axes = plt.subplots(len(variants) * 2, 1, figsize=(6, 4.6))
    for index, (label, kwargs) in enumerate(variants):
        size = 6 if "6" in label else 7 if "7" in label else 8
        w = weights(
            lambda q, k, v, size=size, kwargs=kwargs: winattn.sequence_window_attention(
                q, k, v, size, **kwargs
            ),
            (length,),
        )[0]
        for offset, query in enumerate((1, 19)):
            seen = seen_map(w, query, (length,)).view(1, length)
            draw_grid(axes[2 * index + offset], seen, f"{label}: query {query}")
    fig.suptitle("sequence_window_attention (L = 32)", fontsize=9)
    save(fig, "sequence.png")

    # Windows plus global tokens: the globals drawn as an extra row under the grid.
    grid, num_globals = (12, 12), 4
    w = weights(
        lambda q, k, v, gk, gv: winattn.window_attention_with_globals(
            q, k, v, 4, gk, gv, shift_size=2
        ),
        grid,
        num_globals=num_globals,
    )[0]
    fig, axes = plt.subplots(1, 2, figsize=(5, 3.2))
    for ax, where, label in ((axes[0], (0, 1), "near a border"), (axes[1], (6, 6), "middle")):
        query = flat(grid, *where)
        seen = seen_map(w, query, grid)
        extra = torch.zeros(2, grid[1], dtype=torch.long)
        extra[1, :num_globals] = (w[query, math.prod(grid) :] > 1e-20).long()
        draw_grid(ax, torch.cat([seen, extra]), f"query {where} ({label})\nlast row: globals")
    fig.suptitle("window_attention_with_globals, window 4, shift 2, 4 globals", fontsize=9)
    save(fig, "globals.png")


if __name__ == "__main__":
    main()
