"""Build the cots images with podman on a local Debian base and prove that the serving one serves.

The base (mmdebstrap, reused once imported) -> the serving image and the trainer target -> the
trainer rebuilds an index from a bundle and a gallery -> the serving container turns healthy
and ready and answers both searches, a gallery image and the page -> bad mounts stop it with
one error line -> the Compose files do the same with podman-compose -> image sizes and times,
printed and written as JSON.

    python3 deploy/build_image.py                    a tiny bundle and gallery (the dev install)
    python3 deploy/build_image.py --bundle cots-data/bundles/cots-cpu \\
        --data cots-data/datasets/openclipart --query "a red apple"

Needs root, podman, mmdebstrap and runc (`deploy/install.sh dev` installs them, and the
podman-compose package). With --bundle and --data only the standard library is used.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/cots-base:bookworm"
SERVE = "localhost/cots:cpu"
TRAINER = "localhost/cots-trainer:latest"
USER = 10001  # the images' user `cots`
# A Debian root file system with Python; documentation is left out as in the slim images.
MMDEBSTRAP = [
    "mmdebstrap",
    "--variant=minbase",
    "--include=python3,python3-venv,ca-certificates",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "bookworm",
]
# Where the images look for their data (Dockerfile, docs/deploy.md).
MOUNT_AT = {
    "bundle": "/data/bundles/default",
    "data": "/data/datasets/default",
    "index": "/data/indexes/default",
}
COMPOSE_FILES = ["deploy/docker-compose.yml", "deploy/docker-compose.cpu.yml"]
# How the command line reports a failure (index_builder/cli.py, index_builder/commands.py).
ERROR_LINE = re.compile(r"^cots [a-z ]+: (error|failed): ")
TIMEOUT_S = 180  # for a container to turn ready, or to stop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: a tiny one)")
    parser.add_argument("--data", type=Path, help="gallery dataset directory (default: a tiny one)")
    parser.add_argument("--query", default="a red apple", help="text query to search with")
    parser.add_argument(
        "--report",
        type=Path,
        default=ROOT / "bench" / "results" / "image_build.json",
        help="JSON report to write (default bench/results/image_build.json)",
    )
    parser.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one)")
    parser.add_argument(
        "--rebuild-base", action="store_true", help="make the base image again even if it exists"
    )
    args = parser.parse_args(argv)
    if (args.bundle is None) != (args.data is None):
        parser.error("give --bundle and --data together, or neither for the tiny ones")
    return args


# -- podman on this machine -------------------------------------------------------------------


def engine_config(work: Path) -> Path:
    """A containers.conf for every podman call here (CONTAINERS_CONF): runc, since crun fails
    on hybrid cgroups ("cgroups in hybrid mode not supported"); cgroupfs, since there is no
    systemd; and resource limits runc may set. By default podman asks runc for 1048576 open
    files and processes, and runc may not raise a limit above the one podman runs with
    (nofile: the shell's hard limit; nproc: podman 4.3 lowers its own to 32768)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    path = work / "containers.conf"
    path.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        '\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )
    return path


def podman(*args: str, check: bool = True, timeout: float | None = None) -> str:
    """Run podman; its stdout, stripped. A failure raises with podman's stderr."""
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:2])} failed: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


def timed(*cmd: str) -> float:
    """Run a long command with its output shown; the seconds it took."""
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    return round(time.monotonic() - start, 1)


def size_mb(image: str) -> float:
    return round(int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6, 1)


# -- the images -------------------------------------------------------------------------------


def base_image(work: Path, rebuild: bool) -> dict[str, Any]:
    """Debian bookworm from the Debian mirror with mmdebstrap, imported as BASE; an existing
    BASE is reused."""
    cached = not rebuild and subprocess.run(["podman", "image", "exists", BASE]).returncode == 0
    seconds = 0.0
    if not cached:
        tar = work / "base.tar"
        seconds = timed(*MMDEBSTRAP, str(tar)) + timed("podman", "import", str(tar), BASE)
        tar.unlink()
    return {"image": BASE, "cached": cached, "build_s": seconds, "size_mb": size_mb(BASE)}


def pip_config() -> dict[str, str]:
    """This host's pip settings for `pip install` (files, PIP_* variables): option -> value."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    sections: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.rpartition(".")
        sections.setdefault(section, {})[option] = str(ast.literal_eval(value))
    merged: dict[str, str] = {}
    for section in ("global", "install", ":env:"):  # pip's precedence, lowest first
        merged.update(sections.get(section, {}))
    return merged


def local_paths(value: str) -> set[Path]:
    """The existing local paths a pip setting names: plain paths and file:// URLs; a file://
    `.../simple` index brings its parent, where its pages link the files."""
    found = set()
    for item in value.split():
        path = Path(urlparse(item).path) if item.startswith("file://") else Path(item)
        if path.is_absolute() and path.exists():
            found.add(path.parent if path.name == "simple" else path)
    return found


def pip_build_args(dockerfile: Path, config: dict[str, str]) -> list[str]:
    """`--build-arg PIP_X=value` for each PIP_* argument the Dockerfile declares that this
    host's pip sets, and a read-only `--volume` at the same path for each local path in them."""
    declared = dict.fromkeys(re.findall(r"^ARG (PIP_\w+)", dockerfile.read_text(), re.M))
    args, paths = [], set()
    for name in declared:
        value = config.get(name.removeprefix("PIP_").lower().replace("_", "-"))
        if value:
            args += ["--build-arg", f"{name}={value}"]
            paths |= local_paths(value)
    for path in sorted(paths):
        args += ["--volume", f"{path}:{path}:ro"]
    return args


def build_context(work: Path) -> Path:
    """What Docker would send, copied: the Dockerfile and the paths .dockerignore lets through
    (its `!` lines, less its other patterns). podman 4.3 bind-mounts the whole context for
    `RUN --mount=type=bind` (.dockerignore is not applied there) and writes the install step's
    build/ and cots.egg-info/ through the rw mount into it."""
    text = (ROOT / ".dockerignore").read_text().splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith("#")]
    keep = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    drop = shutil.ignore_patterns(*(p.removeprefix("**/") for p in lines if p[0] not in "!*"))
    context = work / "context"
    for name in ["Dockerfile", *keep]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, context / name, ignore=drop)
        else:
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    return context


def build(context: Path, target: str, tag: str, pip_args: list[str]) -> dict[str, Any]:
    """One target on the local base, without the layer cache (podman 4.3 keys a RUN step's
    cache on its text, not on the sources it bind-mounts). docker format keeps HEALTHCHECK.
    The image the tag named before is removed, unless a container still uses it."""
    previous = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    seconds = timed(
        "podman", "build", "--no-cache", "--format", "docker", "--network", "host",
        "--build-arg", f"BASE_IMAGE={BASE}", *pip_args,
        "--target", target, "--tag", tag, "--file", str(context / "Dockerfile"), str(context),
    )  # fmt: skip
    if previous and previous != podman("image", "inspect", "--format", "{{.Id}}", tag):
        podman("rmi", previous, check=False)
    user = podman("image", "inspect", "--format", "{{.Config.User}}", tag)
    return {"image": tag, "build_s": seconds, "size_mb": size_mb(tag), "user": user}


# -- containers -------------------------------------------------------------------------------


def volumes(index_mode: str = "ro", **sources: Path | None) -> list[str]:
    """--volume options mounting bundle=, data= and index= where the images look for them."""
    return [
        f"--volume={src}:{MOUNT_AT[key]}:{'ro' if key != 'index' else index_mode}"
        for key, src in sources.items()
        if src is not None
    ]


def run_to_exit(image: str, *args: str) -> tuple[int, list[str]]:
    """Run a container to its end: its exit code and log lines (what an operator sees)."""
    name = f"cots-check-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, *args, image)
    try:
        code = int(podman("wait", name, timeout=TIMEOUT_S))
        out = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        return code, (out.stdout + out.stderr).splitlines()
    finally:
        podman("rm", "--force", "--volumes", name, check=False)


def rebuild_index(bundle: Path, data: Path, index: Path) -> float:
    """The trainer image's own command, `cots index rebuild`, into the index root."""
    start = time.monotonic()
    code, log = run_to_exit(
        TRAINER, "--network=none", *volumes("rw", bundle=bundle, data=data, index=index)
    )
    if code != 0:
        raise RuntimeError("the index rebuild failed:\n" + "\n".join(log[-20:]))
    return round(time.monotonic() - start, 1)


def healthcheck(name: str) -> bool:
    """The image's HEALTHCHECK, run now (podman runs it on its interval only with systemd)."""
    return (
        subprocess.run(["podman", "healthcheck", "run", name], capture_output=True).returncode == 0
    )


def wait_for(name: str, start: float, passed: Callable[[], bool]) -> float:
    """Seconds since `start` until passed(); fails if the container stops first."""
    while time.monotonic() - start < TIMEOUT_S:
        if passed():
            return round(time.monotonic() - start, 2)
        if podman("inspect", "--format", "{{.State.Running}}", name) != "true":
            raise RuntimeError(f"container {name} stopped before it was ready")
        time.sleep(0.25)
    raise RuntimeError(f"container {name} not ready after {TIMEOUT_S} s")


@contextmanager
def serving(bundle: Path, data: Path, index: Path) -> Iterator[tuple[str, str, dict[str, float]]]:
    """The serving image with the three mounts read-only and a read-only root (a tmpfs /tmp),
    as the Kubernetes Deployment runs it; yields (name, URL, seconds to healthy and ready)."""
    name = f"cots-serve-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    mounts = volumes(bundle=bundle, data=data, index=index)
    podman(
        "run", "--detach", "--name", name, "--read-only", "-p", "127.0.0.1::8000", *mounts, SERVE
    )
    try:
        url = "http://" + podman("port", name, "8000").splitlines()[0]
        healthy = wait_for(name, start, lambda: healthcheck(name))
        ready = wait_for(name, start, lambda: get(url + "/ready")[0] == 200)
        yield name, url, {"healthy_s": healthy, "ready_s": ready}
    except Exception:
        print(podman("logs", "--tail", "30", name, check=False), file=sys.stderr)
        raise
    finally:
        podman("rm", "--force", "--volumes", name, check=False)


# -- HTTP -------------------------------------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    """(status, content type); no connection is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type()
    except OSError:
        return 0, ""


def post(url: str, body: bytes, content_type: str) -> dict[str, Any]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def search_text(url: str, query: str) -> dict[str, Any]:
    body = json.dumps({"text": query, "k": 3}).encode()
    return post(url + "/search/text-to-image", body, "application/json")


def search_image(url: str, image: Path) -> dict[str, Any]:
    """A multipart upload, as `curl -F image=@FILE` sends it."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return post(url + "/search/image-to-text", body, f"multipart/form-data; boundary={boundary}")


def first_image(data: Path) -> Path:
    with (data / "manifest.jsonl").open(encoding="utf-8") as handle:
        return data / json.loads(handle.readline())["image"]


# -- checks -----------------------------------------------------------------------------------


def check_service(name: str, url: str, query: str, image: Path) -> dict[str, Any]:
    """The process's user and torch, both searches, the top hit's image and thumbnail, the page."""
    uid = int(podman("exec", name, "id", "-u"))
    probe = "import importlib.util as u; print(u.find_spec('torch') is not None)"
    torch = podman("exec", name, "python", "-c", probe) == "True"
    text, captions = search_text(url, query), search_image(url, image)
    top = text["hits"][0] if text["hits"] else {"url": "", "thumbnail_url": ""}
    served = [get(url + top["url"]), get(url + top["thumbnail_url"]), get(url + "/")]
    report = {
        "uid": uid,
        "torch": torch,
        "text_to_image": {"query": query, "hits": len(text["hits"]), "took_ms": text["took_ms"]},
        "image_to_text": {"query": image.name, "hits": len(captions["hits"])},
        "image_thumbnail_page": [f"{status} {kind}" for status, kind in served],
    }
    if uid != USER or torch or not captions["hits"] or [s for s, _ in served] != [200] * 3:
        raise RuntimeError(f"the serving container failed a check: {report}")
    return report


def check_bad_input(bundle: Path, data: Path, index: Path, work: Path) -> dict[str, Any]:
    """Each bad mount stops the container with a non-zero exit code and one error line, which
    names the path (library INFO lines may come before it, a traceback never)."""
    private = work / "bundle-0700"  # as `cots export` wrote bundles before they were 0755
    shutil.copytree(bundle, private, dirs_exist_ok=True)
    private.chmod(0o700)
    cases = {
        "no_bundle_mount": (SERVE, volumes(data=data, index=index)),
        "no_index_mount": (SERVE, volumes(bundle=bundle, data=data)),
        "bundle_unreadable_by_uid_10001": (SERVE, volumes(bundle=private, data=data, index=index)),
        "index_read_only_for_rebuild": (TRAINER, volumes(bundle=bundle, data=data, index=index)),
    }
    found = {}
    for case, (image, mounts) in cases.items():
        code, log = run_to_exit(image, "--network=none", *mounts)
        errors = [line for line in log if ERROR_LINE.match(line)]
        if code == 0 or len(errors) != 1 or any("Traceback" in line for line in log):
            raise RuntimeError(f"{case}: exit {code}, log:\n" + "\n".join(log))
        found[case] = {"exit": code, "log": errors[0]}
    return found


def check_compose(bundle: Path, data: Path, query: str) -> dict[str, Any]:
    """The Compose files as docs/deploy.md runs them, with podman-compose and the CPU override:
    copy a bundle and a gallery into the named volumes, run the rebuild job, start `search`
    and search it; then remove it all, volumes included."""
    if importlib.util.find_spec("podman_compose") is None:
        return {"skipped": "podman-compose is not installed (pip install podman-compose)"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    project = f"cots-check-{uuid.uuid4().hex[:8]}"
    files = [arg for name in COMPOSE_FILES for arg in ("--file", str(ROOT / name))]
    command = [sys.executable, "-m", "podman_compose", *files, "-p", project, "--profile", "jobs"]
    env = {**os.environ, "COTS_PUBLISH_PORT": str(port)}

    def compose(*args: str) -> None:
        out = subprocess.run([*command, *args], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(
                f"podman-compose {args[0]} failed: {(out.stdout + out.stderr)[-3000:]}"
            )

    copy = "cp -r /import/bundle /data/bundles/default && cp -r /import/data /data/datasets/default"
    imports = [f"--volume={bundle}:/import/bundle:ro", f"--volume={data}:/import/data:ro"]
    start = time.monotonic()
    try:
        compose("run", "--rm", *imports, "--entrypoint", "sh", "index-rebuild", "-c", copy)
        compose("run", "--rm", "index-rebuild")
        rebuilt = time.monotonic()
        compose("up", "--detach", "--no-build", "search")
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_for(f"{project}_search_1", rebuilt, lambda: get(url + "/ready")[0] == 200)
        hits = len(search_text(url, query)["hits"])
    finally:  # `down` leaves the containers' anonymous /data volumes: remove them first
        label = f"label=io.podman.compose.project={project}"
        for name in podman("ps", "--all", "--quiet", "--filter", label).split():
            podman("rm", "--force", "--volumes", name, check=False)
        subprocess.run([*command, "down", "--volumes"], capture_output=True, env=env)
    if not hits:
        raise RuntimeError("the Compose service found nothing")
    return {"copy_and_rebuild_s": round(rebuilt - start, 1), "ready_s": ready_s, "hits": hits}


# -- the run ----------------------------------------------------------------------------------


def tiny_fixture(work: Path) -> tuple[Path, Path]:
    """A tiny bundle and gallery made with the test helpers (needs the dev install: onnx)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "index_builder")]
    from tiny_bundles import make_gallery, make_tiny_bundle

    make_tiny_bundle(work / "bundle")
    return work / "bundle", make_gallery(work / "gallery")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    os.environ["CONTAINERS_CONF"] = str(engine_config(work))
    bundle, data = (args.bundle, args.data) if args.bundle else tiny_fixture(work)
    bundle, data = bundle.resolve(), data.resolve()
    base = base_image(work, args.rebuild_base)
    context = build_context(work)
    pip_args = pip_build_args(context / "Dockerfile", pip_config())
    images = {"serve": build(context, "serve", SERVE, pip_args)}
    images["trainer"] = build(context, "trainer", TRAINER, pip_args)
    index = work / "index"
    index.mkdir()
    os.chown(index, USER, USER)
    rebuild_s = rebuild_index(bundle, data, index)
    with serving(bundle, data, index) as (name, url, times):
        service = check_service(name, url, args.query, first_image(data))
    return {
        "command": " ".join(["python3", "deploy/build_image.py", *sys.argv[1:]]),
        "host": {"cpus": os.cpu_count(), "podman": podman("--version").split()[-1]},
        "machine": platform.machine(),
        "base": base,
        "images": images,
        "index_rebuild_s": rebuild_s,
        "start": times,
        "service": service,
        "bad_input": check_bad_input(bundle, data, index, work),
        "compose": check_compose(bundle, data, args.query),
        "total_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("build_image.py: run as root (rootful podman, files for uid 10001)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="cots-image-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"build_image.py: the serving image serves; report in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
