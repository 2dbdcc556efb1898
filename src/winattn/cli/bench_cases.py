"""What ``winattn bench`` measures: peers built on the same weights, interleaved timing, and
the machine's own matmul peak and copy bandwidth (memory in fresh subprocesses:
:mod:`winattn.cli.bench_memory`).

The peers (timm, torchvision, transformers) are benchmark extras, imported here only.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import winattn

#: winattn/timm name -> (torchvision constructor, Hugging Face SwinConfig arguments)
VARIANTS = {
    "swin_tiny_patch4_window7_224": ("swin_t", dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])),
    "swin_small_patch4_window7_224": ("swin_s", dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24])),
    "swin_base_patch4_window7_224": ("swin_b", dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])),
}
#: Swin V2 that torchvision also has (window 8, 256x256): timm's name -> torchvision's
#: constructor. Every other registered V2 model is timed against timm alone. Hugging Face's
#: Swinv2 adds its shift mask twice (docs/swin_v2.md): another function, so it is not timed.
VARIANTS_V2 = {
    "swinv2_tiny_window8_256": "swin_v2_t",
    "swinv2_small_window8_256": "swin_v2_s",
    "swinv2_base_window8_256": "swin_v2_b",
}
SHORT = {"swin_tiny_patch4_window7_224": "Swin-T", "swin_small_patch4_window7_224": "Swin-S",
         "swin_base_patch4_window7_224": "Swin-B", "swinv2_tiny_window8_256": "SwinV2-T",
         "swinv2_small_window8_256": "SwinV2-S", "swinv2_base_window8_256": "SwinV2-B"}


def image_size(variant: str) -> int:
    """The input side a variant is benchmarked at: the size its name ends in (224, 256; 256 for
    a fine-tuned ``..._192to256``)."""
    return int(variant.rsplit("_", 1)[1].rsplit("to", 1)[-1])


def is_v2(variant: str) -> bool:
    return variant.startswith("swinv2_")


# --------------------------------------------------------------------------- timing helpers
def autocast_context(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def balanced_order(count: int) -> list[list[int]]:
    """The rows of a Williams design for ``count`` items: orders in which every item follows
    every other one equally often (and stands first equally often) over the whole design.

    The first row is 0, 1, n-1, 2, n-2, ...; row r adds r mod n to it. For odd n the n rows
    alone cannot balance the neighbours, so their mirror images follow: 2n rows.

    >>> balanced_order(4)
    [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    if count < 1:
        raise ValueError(f"balanced_order needs count >= 1 items, got {count}")
    first, low, high = [0], 1, count - 1
    while low <= high:
        first.append(low)
        low += 1
        if low <= high:
            first.append(high)
            high -= 1
    rows = [[(item + shift) % count for item in first] for shift in range(count)]
    if count % 2 == 1 and count > 1:
        rows += [row[::-1] for row in rows]
    return rows


def balanced_rounds(count: int, repeats: int) -> list[list[int]]:
    """The orders of ``repeats`` timed rounds of ``count`` items: :func:`balanced_order`'s
    rows in turn, ``repeats`` rounded up to whole cycles of the design (else the rows of the
    last, partial cycle would hand some neighbours one more turn than others)."""
    rows = balanced_order(count)
    cycles = -(-repeats // len(rows))
    return rows * cycles


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns so that a change in the
    machine's load hits them all alike. What ran just before a call (its cache and heap state)
    moves its time by up to ~15% on the CPUs measured, so the order of each round comes from a
    balanced design (:func:`balanced_rounds`): within the rounds, each function follows each
    other one equally often and each stands first equally often. ``repeats`` is rounded up to
    whole cycles of the design (n rounds for n functions, 2n for odd n); the warm-up rounds use
    its first row. ``setup[name]``, where given, runs untimed right before each call of
    ``fns[name]`` (a forward before a timed backward)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = [(False, balanced_order(len(names))[0])] * warmup
    rounds += [(True, row) for row in balanced_rounds(len(names), repeats)]
    for timed, row in rounds:
        for name in (names[i] for i in row):
            if setup and name in setup:
                setup[name]()
            start = time.perf_counter()
            fns[name]()
            if timed:
                times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], ours: str = "winattn") -> dict[str, dict]:
    """Median ms, spread, and each peer's median over ours (>1: winattn is faster).

    ``round_ratios``: the quartiles of the per-round ratios (a peer's time over ours in the
    same round), which say how far the ratio moved from round to round: on a shared host
    whose speed drifts, the median ratio can sit on a spread of +-10%. ``times`` lists each
    library's times round by round, as :func:`time_interleaved` returns them."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        name: {
            "median_ms": medians[name] * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "repeats": len(ts),
            "speedup_of_winattn": medians[name] / medians[ours],
            "round_ratios": round_ratio_quartiles(ts, times[ours]),
        }
        for name, ts in times.items()
    }


def round_ratio_quartiles(theirs: list[float], ours: list[float]) -> list[float]:
    """Lower quartile, median and upper quartile of ``theirs[i] / ours[i]`` over the rounds
    (all three the one ratio when there is a single round)."""
    ratios = [t / o for t, o in zip(theirs, ours, strict=True)]
    if len(ratios) < 2:
        return ratios * 3
    low, middle, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return [low, middle, high]


# --------------------------------------------------------------------------- machine
def machine_info() -> dict:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags:")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    except (OSError, subprocess.CalledProcessError):
        isa = []
    from ..ops.backends import cpu_kernel

    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": isa,
        "load_average": os.getloadavg(),
        "winattn_cpu_kernel": cpu_kernel.available(),  # compiled here on first use
    }


def versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "winattn": winattn.__version__}
    for name in ("timm", "torchvision", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def git_commit() -> str | None:
    root = Path(winattn.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def matmul_peak(size: int = 2048, repeats: int = 8) -> dict[str, float]:
    """GFLOP/s of one square matmul, fp32 and bf16: the roofline's compute ceiling as this
    machine delivers it through PyTorch. The best of ``repeats``, since other load on the
    machine can only slow a call down, and the faster of PyTorch's two CPU matmul paths: the
    BLAS behind ``a @ b`` (what ``nn.Linear`` calls) and oneDNN (what winattn's fused linears
    call); on the AMD CPU measured, BLAS ran fp32 at half oneDNN's rate. Both are kept under
    ``"<dtype>_blas"`` and ``"<dtype>_onednn"``; ``"fp32"`` and ``"bf16"`` are the maxima."""
    peaks: dict[str, float] = {}
    onednn = torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        paths = {f"{label}_blas": lambda: a @ b}
        if onednn:  # a @ b.T as a oneDNN linear; the same FLOPs
            paths[f"{label}_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(
                a, b, None, "none", [], ""
            )
        times = time_interleaved(paths, warmup=2, repeats=repeats)
        for name, samples in times.items():
            peaks[name] = 2 * size**3 / min(samples) / 1e9
        peaks[label] = max(peaks[name] for name in paths)
    return peaks


def copy_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written)."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    times = time_interleaved({"copy": lambda: dst.copy_(src)}, warmup=2, repeats=repeats)["copy"]
    return 2 * src.numel() * 4 / min(times) / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------- peers
def _without_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if "relative_position_index" not in k and "attn_mask" not in k}


@dataclass
class Peer:
    """One library's model with a logits function and a features function (NHWC or tokens)."""

    name: str
    model: torch.nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor]


def randomise_norms_(model: torch.nn.Module, seed: int = 0) -> None:
    """LayerNorm gains around 1 and biases around 0. For Swin V2, whose post-norms timm and
    torchvision initialise to zero: that makes every block the identity and would hide a
    wrong attention from the parity check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                noise = 0.1 * torch.randn(param.shape, generator=gen)
                param.copy_(noise + 1.0 if name.endswith("weight") else noise)


def build_peers(variant: str, peers: list[str], img_size: int | None = None, drop_path: float = 0.0) -> tuple[dict[str, Peer], dict]:
    """winattn plus the requested peers, winattn loaded with timm's random-init weights (Swin
    V2's post-norms randomised first: :func:`randomise_norms_`).

    torchvision and transformers models get their own random weights; their parity is checked
    against a winattn model converted from their state dict with ``winattn.load_checkpoint``
    (weights do not change the speed). Returns the peers and notes on any peer left out.
    ``img_size`` is timm's (its V1 masks are built for one size): the variant's by default.
    """
    import timm

    img_size = img_size or image_size(variant)
    timm_model = timm.create_model(variant, img_size=img_size, drop_path_rate=drop_path)
    if is_v2(variant):
        randomise_norms_(timm_model)
    state = timm_model.state_dict()
    ours = winattn.create_model(variant, drop_path_rate=drop_path)
    ours.load_state_dict(state if is_v2(variant) else _without_buffers(state))
    built = {
        "winattn": Peer("winattn", ours, ours, ours.forward_features),
        "timm": Peer("timm", timm_model, timm_model, timm_model.forward_features),
    }
    others = _v2_peers if is_v2(variant) else _v1_peers
    extra, notes = others(variant, peers, img_size)
    built.update(extra)
    for peer in built.values():
        peer.model.eval()
    return built, notes


def _v1_peers(variant: str, peers: list[str], img_size: int) -> tuple[dict[str, Peer], dict]:
    """torchvision's and Hugging Face's Swin V1, on their own random weights."""
    built: dict[str, Peer] = {}
    notes: dict[str, str] = {}
    tv_name, hf_args = VARIANTS[variant]
    if getattr(winattn, "load_checkpoint", None) is None:
        for name in ("torchvision", "transformers"):
            if name in peers:
                notes[name] = "left out: this winattn has no load_checkpoint to check parity with"
        peers = [p for p in peers if p not in ("torchvision", "transformers")]
    if "torchvision" in peers:
        try:
            import torchvision

            tv = getattr(torchvision.models, tv_name)(weights=None)
            built["torchvision"] = Peer("torchvision", tv, tv, lambda x, m=tv: m.norm(m.features(x)))
        except ImportError as err:
            notes["torchvision"] = f"not installed ({err})"
    if "transformers" in peers:
        try:
            import transformers

            config = transformers.SwinConfig(image_size=img_size, window_size=7, num_labels=1000, **hf_args)
            hf = transformers.SwinForImageClassification(config)
            built["transformers"] = Peer(
                "transformers", hf, lambda x, m=hf: m(pixel_values=x).logits,
                lambda x, m=hf: m.swin(pixel_values=x).last_hidden_state,
            )
        except ImportError as err:
            notes["transformers"] = f"not installed ({err})"
    return built, notes


def _v2_peers(variant: str, peers: list[str], img_size: int) -> tuple[dict[str, Peer], dict]:
    """torchvision's Swin V2 where it has the model, on its own random weights with the
    post-norms randomised as timm's are; Hugging Face's left out (another function)."""
    built: dict[str, Peer] = {}
    notes: dict[str, str] = {}
    if "torchvision" in peers and variant not in VARIANTS_V2:
        notes["torchvision"] = "left out: torchvision has no such model"
    elif "torchvision" in peers:
        try:
            import torchvision

            tv = getattr(torchvision.models, VARIANTS_V2[variant])(weights=None)
            randomise_norms_(tv)
            built["torchvision"] = Peer("torchvision", tv, tv, lambda x, m=tv: m.norm(m.features(x)))
        except ImportError as err:
            notes["torchvision"] = f"not installed ({err})"
    if "transformers" in peers:
        notes["transformers"] = ("left out: Hugging Face's Swinv2 adds its shift mask twice, "
                                 "another function (docs/swin_v2.md)")
    return built, notes


def converted_twin(variant: str, peer: Peer) -> torch.nn.Module | None:
    """A winattn model holding ``peer``'s weights (via ``winattn.load_checkpoint``), or None
    when this winattn has no checkpoint conversion yet."""
    if peer.name in ("winattn", "timm"):
        return None
    load = getattr(winattn, "load_checkpoint", None)
    if load is None:
        return None
    twin = winattn.create_model(variant, drop_path_rate=0.0)
    load(twin, peer.model.state_dict())
    return twin.eval()


def check_parity(variant: str, peers: dict[str, Peer], x: torch.Tensor, dtype: str) -> dict[str, dict]:
    """Outputs of every pair agree before anything is timed.

    float32: max |winattn - peer| <= 1e-4 on logits. bf16 autocast (STYLE's rule with float32
    standing in for float64): winattn's error against its float32 output is at most 2x the
    peer's error against the peer's own float32 output, plus 1e-3.
    """
    report = {}
    with torch.no_grad():
        for name, peer in peers.items():
            if name == "winattn":
                continue
            ours = peers["winattn"].model if name == "timm" else converted_twin(variant, peer)
            if ours is None:
                report[name] = {"checked": False, "why": "winattn.load_checkpoint not available"}
                continue
            ref_peer = peer.logits(x).float()
            ref_ours = ours(x).float()
            if dtype == "fp32":
                err = (ref_ours - ref_peer).abs().max().item()
                ok = err <= 1e-4
                report[name] = {"checked": True, "max_abs_diff": err, "tolerance": 1e-4, "ok": ok}
            else:
                with autocast_context(dtype):
                    low_peer = peer.logits(x).float()
                    low_ours = ours(x).float()
                err_ours = (low_ours - ref_ours).abs().max().item()
                err_peer = (low_peer - ref_peer).abs().max().item()
                bound = 2 * err_peer + 1e-3
                report[name] = {"checked": True, "winattn_error": err_ours, "peer_error": err_peer,
                                "bound": bound, "ok": err_ours <= bound}
            if not report[name]["ok"]:
                raise AssertionError(f"outputs of winattn and {name} disagree ({dtype}): {report[name]}")
    return report


# --------------------------------------------------------------------------- training step
def train_step_fn(peer: Peer, x: torch.Tensor, target: torch.Tensor, dtype: str) -> Callable[[], None]:
    model = peer.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with autocast_context(dtype):
            loss = F.cross_entropy(peer.logits(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


#: Parameters whose gradients the training check compares (the first name holding each part
#: that the model has): the patch embedding, a shifted block's qkv, its bias table (V1) or
#: continuous-bias MLP and logit scale (V2), a stage-3 qkv, the head.
GRADIENT_PROBES = (
    "patch_embed.proj.weight",
    "layers.0.blocks.1.attn.qkv.weight",
    "layers.0.blocks.1.attn.relative_position_bias_table",
    "layers.0.blocks.1.attn.cpb_mlp.0.weight",
    "layers.0.blocks.1.attn.logit_scale",
    "layers.2.blocks.1.attn.qkv.weight",
    "head.fc.weight",
)


def _loss_and_gradients(peer: Peer, x: torch.Tensor, target: torch.Tensor, dtype: str,
                        names: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """One training forward and backward with gradients on (the path a training step takes):
    the loss and the float32 gradients of ``names``; the model's gradients are cleared after."""
    model = peer.model.train()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        with autocast_context(dtype):
            loss = F.cross_entropy(peer.logits(x).float(), target)
        loss.backward()
    params = dict(model.named_parameters())
    grads = {name: params[name].grad.detach().float().clone() for name in names}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def check_training_parity(peers: dict[str, Peer], x: torch.Tensor, target: torch.Tensor,
                          dtype: str) -> dict:
    """winattn and timm compute the same training step: the same loss and gradients, checked
    with gradients on (winattn trains through autograd Functions of its own, which a
    ``no_grad`` comparison never runs) on the same inputs and targets, drop path off.

    Compared: the loss, and the gradients of :data:`GRADIENT_PROBES`, each gradient's error
    as max |difference| over the reference's max |gradient|. float32: within 1e-4 of timm's.
    bf16 autocast (STYLE.md's rule, timm's float32 step as the reference): winattn's error at
    most 2x (loss) or 3x (gradients) timm's own bf16 error, plus 1e-3. Raises AssertionError
    otherwise; returns the errors and bounds.
    """
    ours, theirs = peers["winattn"], peers["timm"]
    own = {name for name, _ in ours.model.named_parameters()}
    names = [n for n, _ in theirs.model.named_parameters() if n in GRADIENT_PROBES and n in own]
    ref_loss, ref_grads = _loss_and_gradients(theirs, x, target, "fp32", names)

    def errors(loss: float, grads: dict[str, torch.Tensor]) -> dict[str, float]:
        found = {"loss": abs(loss - ref_loss)}
        for name in names:
            scale = ref_grads[name].abs().max().clamp_min(1e-12)
            found[name] = ((grads[name] - ref_grads[name]).abs().max() / scale).item()
        return found

    ours_err = errors(*_loss_and_gradients(ours, x, target, dtype, names))
    if dtype == "fp32":
        bounds = {key: 1e-4 for key in ours_err}
        peer_err = None
    else:
        peer_err = errors(*_loss_and_gradients(theirs, x, target, dtype, names))
        bounds = {key: (2 if key == "loss" else 3) * peer_err[key] + 1e-3 for key in ours_err}
    bad = {key: (ours_err[key], bounds[key]) for key in ours_err if ours_err[key] > bounds[key]}
    report = {"checked": names, "winattn_error": ours_err, "peer_error": peer_err,
              "bound": bounds, "ok": not bad}
    if bad:
        raise AssertionError(
            f"winattn's and timm's training steps disagree ({dtype}; error, bound): {bad}"
        )
    return report


def time_training_steps(
    peers: dict[str, Peer], x: torch.Tensor, target: torch.Tensor, dtype: str, warmup: int,
    repeats: int,
) -> tuple[dict[str, dict], dict]:
    """Training steps of ``peers`` taking turns (:func:`train_step_fn`), after checking that
    winattn and timm compute the same loss and gradients (:func:`check_training_parity`).
    Returns :func:`summarise`'s medians with each library's ``activation_mib`` (bytes autograd
    saves in one forward), and the check's report."""
    parity = check_training_parity(peers, x, target, dtype)
    activations = {n: saved_activation_bytes(p, x, dtype) / 2**20 for n, p in peers.items()}
    fns = {n: train_step_fn(p, x, target, dtype) for n, p in peers.items()}
    summary = summarise(time_interleaved(fns, warmup, repeats))
    for name, stats in summary.items():
        stats["activation_mib"] = activations[name]
    return summary, parity


def saved_tensor_bytes(fn: Callable[[], object], params) -> tuple[object, int]:
    """``fn()`` and the bytes of the distinct storages autograd saves for its backward,
    ``params``' own storages excluded."""
    excluded = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def saved_activation_bytes(peer: Peer, x: torch.Tensor, dtype: str) -> int:
    """Bytes autograd keeps for backward after one forward (distinct storages, parameters
    excluded): the activation memory of a training step."""
    peer.model.train()

    def forward() -> None:
        with autocast_context(dtype):
            peer.logits(x)

    return saved_tensor_bytes(forward, peer.model.parameters())[1]
