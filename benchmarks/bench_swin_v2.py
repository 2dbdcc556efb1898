"""Swin V2 on the CPU: winattn against timm and torchvision, in one process on the same
weights and inputs: inference, and with ``--train`` a training step against timm.

timm's model gets random weights with non-trivial post-norms (timm initialises them to zero,
which makes every block the identity and would hide a wrong attention), and winattn loads its
state dict; torchvision's ``swin_v2_t`` (window 8, 256x256: only for
``swinv2_tiny_window8_256``) keeps its own random weights, and a winattn model converted from
them with ``winattn.load_checkpoint`` must reproduce it. Before anything is timed the outputs
must agree: float32 within 1e-4, bf16 autocast by STYLE's rule (winattn's error against its
float32 output at most 2x the peer's own plus 1e-3). Then the libraries take turns call by
call (the order rotating each round, as ``winattn bench`` does); medians and ratio = peer
median / winattn median (above 1: winattn is faster). Hugging Face's Swinv2 adds the shift
mask twice (docs/swin_v2.md), so it computes another function and is not timed here.

The training step (``--train``; batch 8, forward, cross-entropy, backward, AdamW as
``winattn bench`` times it, drop path off in both so that they compute the same function,
checked in train mode first) is timed against timm only, with the activation memory (bytes
autograd saves in one forward).

    PYTHONPATH=src python benchmarks/bench_swin_v2.py --train --out docs/perf-v2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import winattn
from winattn.cli import bench_cases as cases

TORCHVISION = {"swinv2_tiny_window8_256": "swin_v2_t"}


def randomise_norms_(model: torch.nn.Module, seed: int = 0) -> None:
    """LayerNorm gains around 1 and biases around 0, instead of timm's zeroed post-norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                noise = 0.1 * torch.randn(param.shape, generator=gen)
                param.copy_(noise + 1.0 if name.endswith("weight") else noise)


def build(name: str, peers: list[str]) -> tuple[dict, dict]:
    """``{library: (model, twin)}``: twin is the winattn model that must reproduce the peer."""
    import timm

    resolution = int(name.rsplit("_", 1)[1])
    timm_model = timm.create_model(name, drop_path_rate=0.0).eval()
    randomise_norms_(timm_model)
    ours = winattn.create_model(name, drop_path_rate=0.0).eval()
    ours.load_state_dict(timm_model.state_dict())
    built = {"winattn": (ours, None), "timm": (timm_model, ours)}
    if "torchvision" in peers and name in TORCHVISION:
        import torchvision

        tv = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
        randomise_norms_(tv)
        twin = winattn.create_model(name).eval()
        winattn.load_checkpoint(twin, tv.state_dict())
        built["torchvision"] = (tv, twin)
    return built, {"resolution": resolution}


def check_parity(built: dict, x: torch.Tensor, dtype: str) -> dict:
    report = {}
    with torch.no_grad():
        for library, (model, twin) in built.items():
            if twin is None:
                continue
            ref_peer, ref_ours = model(x).float(), twin(x).float()
            if dtype == "fp32":
                err = (ref_ours - ref_peer).abs().max().item()
                report[library] = {"max_abs_diff": err, "tolerance": 1e-4, "ok": err <= 1e-4}
            else:
                with cases.autocast_context(dtype):
                    low_peer, low_ours = model(x).float(), twin(x).float()
                err_ours = (low_ours - ref_ours).abs().max().item()
                err_peer = (low_peer - ref_peer).abs().max().item()
                bound = 2 * err_peer + 1e-3
                report[library] = {"winattn_error": err_ours, "peer_error": err_peer,
                                   "bound": bound, "ok": err_ours <= bound}
            if not report[library]["ok"]:
                raise AssertionError(f"winattn and {library} disagree ({dtype}): {report[library]}")
    return report


def training_rows(name: str, built: dict, resolution: int, dtypes: list[str], repeats: int,
                  lines: list[str]) -> list[dict]:
    """A training step of winattn and timm at batch 8 (see the module docstring)."""
    batch = 8
    x = torch.randn(batch, 3, resolution, resolution)
    target = torch.randint(0, 1000, (batch,))
    peers = {lib: cases.Peer(lib, built[lib][0], built[lib][0], built[lib][0].forward_features)
             for lib in ("winattn", "timm")}
    rows = []
    for dtype in dtypes:
        print(f"[{time.strftime('%H:%M:%S')}] {name} training step {dtype}", flush=True)
        for peer in peers.values():
            peer.model.train()
        with torch.no_grad():  # drop path is off: train mode computes the eval function
            err = (peers["winattn"].logits(x) - peers["timm"].logits(x)).abs().max().item()
        if err > 1e-4:
            raise AssertionError(f"winattn and timm disagree in train mode: {err}")
        saved = {lib: cases.saved_activation_bytes(p, x, dtype) / 2**20
                 for lib, p in peers.items()}
        fns = {lib: cases.train_step_fn(p, x, target, dtype) for lib, p in peers.items()}
        summary = cases.summarise(cases.time_interleaved(fns, 1, repeats))
        for lib, stats in summary.items():
            stats["activation_mib"] = saved[lib]
            lines.append(f"| {name} train | {batch} | {dtype} | {lib} | "
                         f"{stats['median_ms']:.0f} | {stats['speedup_of_winattn']:.2f}x | "
                         f"activations {saved[lib]:.0f} MiB |")
        rows.append(dict(model=name, batch=batch, dtype=dtype, mode="train", max_abs_diff=err,
                         peers=summary))
    for peer in peers.values():
        peer.model.eval()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swinv2_tiny_window8_256"])
    parser.add_argument("--peers", nargs="+", default=["timm", "torchvision"],
                        choices=["timm", "torchvision"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="also time a training step")
    parser.add_argument("--train-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"command": " ".join([Path(sys.executable).name] + sys.argv),
               "machine": cases.machine_info(), "versions": cases.versions(),
               "commit": cases.git_commit(), "threads": torch.get_num_threads(), "rows": []}
    lines = ["| model | batch | dtype | library | median ms | ratio | parity |",
             "|---|---|---|---|---|---|---|"]
    for name in args.models:
        built, info = build(name, args.peers)
        for batch in args.batches:
            x = torch.randn(batch, 3, info["resolution"], info["resolution"])
            for dtype in args.dtypes:
                print(f"[{time.strftime('%H:%M:%S')}] {name} batch {batch} {dtype}", flush=True)
                parity = check_parity(built, x, dtype)
                fns = {lib: (lambda m=model: m(x)) for lib, (model, _) in built.items()}
                with torch.no_grad(), cases.autocast_context(dtype):
                    times = cases.time_interleaved(fns, args.warmup, args.repeats)
                summary = cases.summarise(times)
                results["rows"].append(dict(model=name, batch=batch, dtype=dtype,
                                            parity=parity, peers=summary))
                for lib, stats in summary.items():
                    check = "-" if lib == "winattn" else ("ok" if parity[lib]["ok"] else "FAIL")
                    ratio = stats["speedup_of_winattn"]
                    lines.append(f"| {name} | {batch} | {dtype} | {lib} | "
                                 f"{stats['median_ms']:.1f} | {ratio:.2f}x | {check} |")
        if args.train:
            results["rows"] += training_rows(name, built, info["resolution"], args.dtypes,
                                             args.train_repeats, lines)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        header = (f"Swin V2 inference, `{results['command']}`, commit `{results['commit']}`, "
                  f"{results['threads']} threads, torch {results['versions'].get('torch')}\n\n")
        (args.out / "results.md").write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
