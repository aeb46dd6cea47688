"""`cots demo`: the main job: build the gallery, train, evaluate, export, index and serve,
reusing every stage that already finished (so a rerun goes straight to serving)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from index_builder import paths
from index_builder.atomic import atomic_write_json, read_json
from index_builder.manifest import manifest_path
from training.config import add_override_argument

DONE = "DONE.json"
BUILT_IN = ("openclipart", "emoji", "synthetic")
MERGED = "builtin"  # the merge of the galleries the demo trains on
TEST_METRICS = "test_metrics.json"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole pipeline on the built-in galleries and serve Open Clip Art",
        description="data (Open Clip Art, emoji, synthetic scenes, merged) -> train (a CPU "
        "recipe) -> eval (test split, per gallery) -> export (ONNX bundle) -> index (FAISS, "
        "Open Clip Art) -> serve. Artifacts go under $COTS_HOME (default "
        "./cots-data); finished stages are reused, an interrupted training run resumes.",
    )
    parser.add_argument(
        "--recipe", default="cots-cpu", help="training recipe or run file (default cots-cpu)"
    )
    parser.add_argument(
        "--name", default="demo", help="name of the run, bundle and index (default demo)"
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        help="train on and serve this gallery directory instead of the built-in ones",
    )
    parser.add_argument(
        "--galleries",
        default="openclipart",
        help=f"built-in galleries to train on, merged when several (of {', '.join(BUILT_IN)}; "
        "default openclipart: adding the others raised in-domain recall but lowered "
        "zero-shot recall on photographs, README); Open Clip Art is always built and served",
    )
    add_override_argument(
        parser, "training config override (repeatable), e.g. --set train.epochs=10"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    parser.add_argument(
        "--no-serve", action="store_true", help="stop after indexing instead of serving"
    )
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    galleries = gallery_names(args.galleries)
    served = args.dataset or paths.dataset_dir("openclipart")
    data = args.dataset or training_data(galleries)
    run, bundle = paths.run_dir(args.name), paths.bundle_dir(args.name)
    index = paths.index_root(args.name)
    best = run / "checkpoints" / "best"
    stages = [
        ("data: galleries", lambda: build_galleries(args.dataset, galleries)),
        ("train", lambda: train(args.recipe, args.sets, data, run)),
        ("eval: test split", lambda: evaluate(best, data, run / TEST_METRICS)),
        ("export: ONNX bundle", lambda: export(best, bundle)),
        ("index: FAISS", lambda: build_index(bundle, served, index)),
    ]
    start = time.perf_counter()
    for number, (title, action) in enumerate(stages, 1):
        print(f"\n== {number}/6 {title}  (t={time.perf_counter() - start:.0f}s)", flush=True)
        code = action()
        if code:
            print(f"cots demo: stage {title!r} failed (exit {code}); rerun to continue from it")
            return code
    print(f"\npipeline ready in {time.perf_counter() - start:.0f}s: bundle {bundle}, index {index}")
    if args.no_serve:
        return 0
    print("\n== 6/6 serve", flush=True)
    print_examples(args.host, args.port)
    return cots("serve", "--bundle", bundle, "--index", index, "--host", args.host,
                "--port", args.port)  # fmt: skip


def cots(*argv: object) -> int:
    """Run one stage through the real command line (same checks, same errors)."""
    from index_builder.cli import main

    return main([str(a) for a in argv])


def gallery_names(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BUILT_IN))
    if unknown or not names:
        raise ValueError(
            f"--galleries takes built-in gallery names ({', '.join(BUILT_IN)}), got {spec!r}"
        )
    return names


def training_data(galleries: list[str]) -> Path:
    """One gallery trains as it is; several as their merge."""
    return paths.dataset_dir(galleries[0] if len(galleries) == 1 else MERGED)


def build_galleries(given: Path | None, galleries: list[str]) -> int:
    """Open Clip Art (served) and every gallery trained on, then their merge."""
    if given is not None:
        print(f"using the gallery {manifest_path(given).parent}")  # FileNotFoundError if missing
        return 0
    for name in dict.fromkeys(["openclipart", *galleries]):
        code = cots("data", name, "--out", paths.dataset_dir(name))
        if code:
            return code
    if len(galleries) == 1:
        return 0
    named = [f"{name}={paths.dataset_dir(name)}" for name in galleries]
    return cots("data", "merge", *named, "--out", paths.dataset_dir(MERGED))


def train(recipe: str, sets: list[str], data: Path, run: Path) -> int:
    """Train, resume an interrupted run, or reuse a finished one (marked by DONE.json) when
    it was trained with the config that `recipe` and `sets` give now; a finished run of
    another config (an edited recipe, other --set) is kept aside and trained again."""
    if (run / DONE).is_file():
        if same_config(run, recipe, sets) and read_json(run / DONE).get("data") == str(data):
            print(f"reusing the finished run {run}")
            return 0
        kept = run.with_name(f"{run.name}-previous-{time.strftime('%Y%m%dT%H%M%S')}")
        run.rename(kept)
        print(f"the finished run {run} has another config or data than {recipe} on {data} "
              f"gives now: kept it as {kept}, training again")  # fmt: skip
    resume = ["--resume"] if (run / "checkpoints" / "last").is_dir() else []
    overrides = [f"--set={item}" for item in sets]
    code = cots("train", recipe, *overrides, "--data", data, "--out", run, *resume)
    if code == 0:
        atomic_write_json(run / DONE, {"recipe": recipe, "overrides": sets, "data": str(data)})
    return code


def same_config(run: Path, recipe: str, sets: list[str]) -> bool:
    """Whether the run's saved config.json is the one the recipe and overrides give now."""
    from training.config import load_config

    saved = read_json(run / "config.json") if (run / "config.json").is_file() else None
    if saved is None:
        return True  # a run from before config.json existed: nothing to compare
    saved.pop("model_config", None)
    current = json.loads(json.dumps(load_config(recipe, sets).to_dict()))  # tuples -> lists
    return {**saved, "name": None} == {**current, "name": None}


def evaluate(checkpoint: Path, data: Path, out: Path) -> int:
    from training.checkpoint import read_meta

    step = read_meta(checkpoint).get("step")
    if out.is_file() and read_json(out).get("step") == step:
        print(json.dumps(read_json(out), indent=2))
        return 0
    return cots("eval", "--checkpoint", checkpoint, "--data", data, "--split", "test",
                "--out", out)  # fmt: skip


def export(checkpoint: Path, bundle: Path) -> int:
    if bundle_is_current(bundle, checkpoint):
        return 0
    return cots("export", "--checkpoint", checkpoint, "--out", bundle)


def build_index(bundle: Path, data: Path, root: Path) -> int:
    if index_is_current(root, bundle):
        return 0
    return cots("index", "build", root, "--bundle", bundle, "--data", data)


def bundle_is_current(bundle: Path, checkpoint: Path) -> bool:
    """A bundle exported from this very checkpoint (same path, same weights) is reused."""
    from index_builder.bundle import Bundle
    from index_builder.preprocess import sha256_file
    from training.checkpoint import WEIGHTS

    if not (bundle / "bundle.json").is_file():
        return False
    source = Bundle.load(bundle).info.get("source", {})
    same = source.get("checkpoint") == str(checkpoint.resolve())
    if same and source.get("weights_sha256") == sha256_file(checkpoint / WEIGHTS):
        print(f"reusing bundle {bundle}")
        return True
    return False


def index_is_current(root: Path, bundle: Path) -> bool:
    from index_builder.backends.faiss.store import IndexStore
    from index_builder.bundle import Bundle

    store = IndexStore(root)
    if store.current() is None:
        return False
    # the export stage just verified the bundle's files; its id is all this needs
    if store.read_info().get("bundle_id") == Bundle.load(bundle, verify=False).bundle_id:
        print(f"reusing index {root} version {store.current()}")
        return True
    return False


def print_examples(host: str, port: int) -> None:
    base = f"http://{host}:{port}"
    print(f"open {base}/ in a browser, or:")
    print(f"  curl -s {base}/search/text-to-image -H 'Content-Type: application/json' "
          "-d '{\"text\": \"a red apple\", \"k\": 5}'")  # fmt: skip
    print(f"  curl -s {base}/search/image-to-text -F image=@some.png -F k=5", flush=True)
