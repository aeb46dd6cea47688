"""Text-to-video on the synthetic video gallery: meanP vs seqTransf, and indexing throughput.

    python -m bench.video_bench [--home cots-data] [--count 400] [--threads 1]

Runs the real commands (a stage whose output exists is reused): `cots data synthetic-video`,
`cots train cots-video-cpu` once per pooling, `cots eval` on the test split, `cots export` and
`cots index build` of the whole gallery with the seqTransf bundle (timed: videos/s), then
times decoding and encoding alone on the same videos. Writes bench/results/video.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
POOLINGS = ("meanP", "seqTransf")


def cots(*args: str, env: dict) -> float:
    """Run `cots ARGS`; returns the wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "index_builder.cli", *args], env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"cots {' '.join(args)} failed with exit code {done.returncode}")
    return round(time.perf_counter() - start, 1)


def evaluation(home: Path, data: Path, env: dict, steps: list) -> list[dict]:
    rows = []
    for pooling in POOLINGS:
        run = home / "runs" / f"video-{pooling}"
        best = run / "checkpoints" / "best"
        if not best.is_dir():
            train = ["train", "cots-video-cpu", "--data", str(data), "--out", str(run)]
            train += ["--set", f"model.options.video_pooling={pooling}"]
            steps.append({"step": f"train {pooling}", "command": "cots " + " ".join(train),
                          "seconds": cots(*train, env=env)})  # fmt: skip
        out = run / "test.json"
        evaluate = ["eval", "--checkpoint", str(best), "--data", str(data), "--split", "test"]
        steps.append({"step": f"eval {pooling}", "command": "cots " + " ".join(evaluate),
                      "seconds": cots(*evaluate, "--out", str(out), env=env)})  # fmt: skip
        m = json.loads(out.read_text())
        rows.append(
            {
                "pooling": pooling,
                "videos": m["videos"],
                "captions": m["captions"],
                **{f"t2v R@{k}": round(m[f"t2i_r{k}"], 1) for k in (1, 5, 10)},
                "t2v MdR": m["t2i_medr"],
                **{f"v2t R@{k}": round(m[f"i2t_r{k}"], 1) for k in (1, 5, 10)},
                "v2t MdR": m["i2t_medr"],
                "RSUM": round(m["rsum"], 1),
            }
        )
    return rows


def indexing(home: Path, data: Path, threads: int, env: dict, steps: list) -> dict:
    run = home / "runs" / "video-seqTransf" / "checkpoints" / "best"
    bundle = home / "bundles" / "video-seqTransf"
    export = ["export", "--checkpoint", str(run), "--out", str(bundle)]
    steps.append({"step": "export", "command": "cots " + " ".join(export),
                  "seconds": cots(*export, env=env)})  # fmt: skip
    index = home / "indexes" / "video-bench"
    build = ["index", "build", str(index), "--bundle", str(bundle), "--data", str(data)]
    build += ["--threads", str(threads), "--cpu"]
    seconds = cots(*build, env=env)
    steps.append({"step": "index build", "command": "cots " + " ".join(build), "seconds": seconds})
    info = json.loads((index / "versions" / (index / "CURRENT").read_text().strip() /
                       "index.json").read_text())  # fmt: skip
    videos = info["sides"]["image"]["count"]
    return {
        "videos": videos,
        "captions": info["sides"]["text"]["count"],
        "frames per video": json.loads((bundle / "bundle.json").read_text())["video_spec"][
            "frames"
        ],
        "threads": threads,
        "index build s": seconds,
        "videos/s (whole command)": round(videos / seconds, 2),
        **stages(bundle, data, threads),
    }


def stages(bundle_dir: Path, data: Path, threads: int, limit: int = 100) -> dict:
    """Decode (PyAV, sampled frames) and encode (frames + pooling) times per video."""
    from index_builder.bundle import Bundle
    from index_builder.encoders import Encoders
    from index_builder.manifest import image_path, load_records
    from index_builder.video import decode_video, video_pixels

    bundle = Bundle.load(bundle_dir)
    encoders = Encoders.open(bundle, threads=threads)
    assert encoders.video is not None and bundle.video_spec is not None
    records = load_records(data)[:limit]
    decode = encode = 0.0
    for record in records:
        start = time.perf_counter()
        clip = decode_video(image_path(data, record), bundle.video_spec.frames)
        pixels, mask = video_pixels(clip.frames, bundle.image_spec, bundle.video_spec.frames)
        decode += time.perf_counter() - start
        start = time.perf_counter()
        encoders.video.encode_pixels(pixels[None], mask[None])
        encode += time.perf_counter() - start
    n = len(records)
    return {
        "decode ms/video": round(1000 * decode / n, 1),
        "encode ms/video": round(1000 * encode / n, 1),
        "videos/s (decode + encode)": round(n / (decode + encode), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("cots-data"), help="COTS_HOME")
    parser.add_argument("--count", type=int, default=400, help="clips in the gallery (400)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "video.json")
    args = parser.parse_args()
    home = args.home.resolve()
    env = {**os.environ, "COTS_HOME": str(home), "OMP_NUM_THREADS": "1"}
    data = home / "datasets" / "synthetic-video"
    steps: list[dict] = []
    made = ["data", "synthetic-video", "--count", str(args.count), "--out", str(data)]
    steps.append(
        {"step": "data", "command": "cots " + " ".join(made), "seconds": cots(*made, env=env)}
    )
    result = {
        "command": f"python -m bench.video_bench --count {args.count} --threads {args.threads}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "gallery": f"synthetic-video, {args.count} clips (96 px, 16 frames, 8 fps), seed 0",
        "evaluation": evaluation(home, data, env, steps),
        "indexing": [indexing(home, data, args.threads, env, steps)],
        "steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["evaluation"], indent=2))
    print(json.dumps(result["indexing"], indent=2))
    return 0


FIGURE = Figure(
    "Text-to-video: meanP vs seqTransf, video indexing throughput",
    "video*.json",
    "python -m bench.video_bench --count 400 --threads 1",
)


if __name__ == "__main__":
    sys.exit(main())
