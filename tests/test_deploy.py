"""The deployment files against the application: every command, flag, port, route, setting,
install profile and path that the Dockerfile, the Compose file and the Kubernetes manifests
name must exist in the code (no Docker engine or cluster needed)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from index_builder.cli import build_parser, main
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
INSTALL = ROOT / "deploy" / "install.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Variables the images set that are not service settings, and who reads them.
NON_SETTINGS_ENV = {
    "COTS_HOME": ROOT / "index_builder" / "paths.py",
    "COTS_EDITABLE": INSTALL,
    "COTS_WITH_MILVUS": INSTALL,
    "COTS_VENV": INSTALL,
    "COTS_MILVUS_CACHE": ROOT / "index_builder" / "backends" / "milvus" / "server.py",
}
# Packages a serving host does not have (the train extra); `cots serve` must work without them.
TRAIN_ONLY = ["torch", "safetensors", "onnx", "onnxscript", "cairosvg", "emoji", "training.model"]


# -- the application's real names -------------------------------------------------------------


def settings_env() -> dict[str, str]:
    """Environment variable -> Settings field."""
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): name for name in Settings.model_fields}


def app_routes() -> dict[str, dict[str, Any]]:
    """Path -> {method: OpenAPI operation} of the real FastAPI app, built without loading."""
    from service.app import create_app

    app = create_app(Settings(bundle=Path("/nonexistent"), index=Path("/nonexistent")))
    return app.openapi()["paths"]


def needs_key(operation: dict[str, Any]) -> bool:
    """The app declares its API-key dependencies as OpenAPI security requirements."""
    return bool(operation.get("security"))


def parse_cli(argv: list[str]) -> Any:
    """Parse with the real `cots` parser; an unknown command or flag fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`cots {shlex.join(argv)}` does not parse") from exc


def command_path(argv: list[str]) -> list[str]:
    """The subcommand names at the head of argv, e.g. ["index", "rebuild"]."""
    parser, path = build_parser(), []
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        parser, path = subs[0].choices[token], [*path, token]
    return path


def parse_rebuild(argv: list[str]) -> Any:
    """`cots index rebuild ...`, the batch job, parsed with the real parser."""
    assert command_path(argv) == ["index", "rebuild"], argv
    return parse_cli(argv)


def serve_switches() -> set[str]:
    """`cots serve` flags that take no value (`--follow-bundle`)."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {o for a in sub.choices["serve"]._actions if a.nargs == 0 for o in a.option_strings}


def serve_default_port() -> int:
    return parse_cli(["serve"]).port


def install_profiles() -> dict[str, list[str]]:
    """Profile -> pyproject extras it installs, read from deploy/install.sh itself."""
    out = subprocess.run(["bash", str(INSTALL), "no-such-profile"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    listed = re.search(r"\(([\w, ]+)\)", out.stderr)
    assert listed, out.stderr
    extras = dict(re.findall(r"^\s*(\w+)\)\s.*\"\$here\[([\w,]+)\]\"", INSTALL.read_text(), re.M))
    profiles = [p.strip() for p in listed.group(1).split(",")]
    assert sorted(extras) == sorted(profiles)
    return {name: extras[name].split(",") for name in profiles}


def requirements(extra: str) -> list[str]:
    """An extra's requirements with `cots[...]` self-references expanded."""
    found = []
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        nested = re.fullmatch(r"cots\[([\w,]+)\]", req)
        found += (
            [r for e in nested.group(1).split(",") for r in requirements(e)] if nested else [req]
        )
    return found


def dist_names(extras: list[str]) -> set[str]:
    return {
        re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for e in extras for r in requirements(e)
    }


def under(path: str, mounts: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(m) for m in mounts)


def check_settings(env: dict[str, str]) -> Settings:
    """The real Settings class accepts these variables (names and values)."""
    unknown = {k for k in env if k.startswith("COTS_")} - set(settings_env())
    assert not unknown, f"not service settings: {sorted(unknown)}"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("COTS_")}
    try:
        os.environ.update(env)
        return Settings()  # type: ignore[call-arg]
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


# -- the Dockerfile -----------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)

    def all(self, kind: str) -> list[str]:
        return [value for k, value in self.steps if k == kind]

    def last(self, kind: str) -> str:
        values = self.all(kind)
        assert values, f"stage {self.name} has no {kind}"
        return values[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name); comment lines and line continuations handled."""
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw.strip())
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in lines:
        kind, _, value = line.partition(" ")
        kind, value = kind.upper(), value.strip()
        if kind == "FROM":
            parts = re.split(r"\s+as\s+", value, flags=re.I)
            base, name = parts[0], parts[1] if len(parts) > 1 else f"stage{len(stages)}"
            stage = stages[name] = Stage(name, base)
        elif stage is None:
            assert kind == "ARG", line
            key, _, default = value.partition("=")
            args[key] = default
        else:
            stage.steps.append((kind, value))
    return args, stages


def exec_form(value: str) -> list[str]:
    assert value.startswith("["), f"use the exec form: {value}"
    return json.loads(value)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in stage.all("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(value))
    return env


def chain(stages: dict[str, Stage], name: str, args: dict[str, str]) -> list[Stage]:
    """The stage and its ancestors inside this Dockerfile, base first."""
    found = []
    while name in stages:
        found.insert(0, stages[name])
        name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stages[name].base)
    return found


def installed_profiles(stages: list[Stage]) -> list[str]:
    runs = [run for stage in stages for run in stage.all("RUN")]
    return [m for run in runs for m in re.findall(r"deploy/install\.sh\s+(\w+)", run)]


def healthcheck_command(stage: Stage) -> list[str]:
    options, _, command = stage.last("HEALTHCHECK").partition("CMD ")
    assert "--interval" in options
    return exec_form(command.strip())


def url_of(command: list[str]) -> tuple[int, str]:
    url = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/-]*)", " ".join(command))
    assert url, f"no local URL in the health check {command}"
    return int(url.group(1)), url.group(2)


def volumes(stage: Stage) -> list[str]:
    return [v for value in stage.all("VOLUME") for v in exec_form(value)]


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def routes() -> dict[str, Any]:
    return app_routes()


def serve_profiles(args: dict[str, str], stages: dict[str, Stage]) -> dict[str, str]:
    """Base kind ("cuda" or "other") -> the install profile the serving image gets on it."""
    runs = " ".join(run for stage in chain(stages, "serve", args) for run in stage.all("RUN"))
    picked = re.search(
        r'if \[ -n "\$\{CUDA_VERSION:-\}" \]; then profile=(\w+); else profile=(\w+); fi', runs
    )
    assert picked and 'deploy/install.sh "$profile"' in runs, "the profile follows the base"
    return {"cuda": picked.group(1), "other": picked.group(2)}


def test_dockerfile_targets_and_base_image(dockerfile):
    args, stages = dockerfile
    assert {"serve", "trainer"} <= set(stages)
    assert list(stages)[-1] == "serve", "the default target (the last stage) is the service"
    # One build argument, the base image: the GPU and CPU images differ by nothing else.
    assert list(args) == ["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    for target in ("serve", "trainer"):
        assert chain(stages, target, args)[0].base == "${BASE_IMAGE}"
    assert serve_profiles(args, stages) == {"cuda": "gpu", "other": "serve"}


def test_every_install_step_is_install_sh_with_a_real_profile(dockerfile):
    _, stages = dockerfile
    profiles = install_profiles()
    for stage in stages.values():
        for run in stage.all("RUN"):
            assert "pip install" not in run, f"{stage.name}: install through deploy/install.sh"
        for profile in installed_profiles([stage]):
            assert profile in profiles, f"{stage.name}: install.sh has no profile {profile!r}"
    for extras in profiles.values():
        assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])


@pytest.mark.parametrize("base", ["cuda", "other"])
def test_serving_image_has_no_torch(dockerfile, base):
    args, stages = dockerfile
    serve = chain(stages, "serve", args)
    assert installed_profiles(serve) == []  # only the profile the base picks
    dists = dist_names(install_profiles()[serve_profiles(args, stages)[base]])
    assert "torch" not in dists
    if base == "cuda":
        assert {"onnxruntime-gpu", "faiss-gpu"} <= dists
        assert not {"onnxruntime", "faiss-cpu"} & dists
    else:
        assert {"onnxruntime", "faiss-cpu"} <= dists
    runs = " ".join(stages["serve"].all("RUN"))
    assert "find_spec('torch') is not None" in runs, "the build must fail if torch is present"
    assert any("COTS_EDITABLE=0" in s.all("ENV")[0] for s in serve if s.all("ENV"))


def test_serving_entry_point_runs_without_torch(dockerfile):
    """What the image runs (`cots serve ...`, the app module) imports none of the train extra."""
    _, stages = dockerfile
    argv = exec_form(stages["serve"].last("CMD"))
    code = (
        "import sys\n"
        f"for name in {TRAIN_ONLY!r}: sys.modules[name] = None\n"
        "from index_builder.cli import build_parser\n"
        f"build_parser().parse_args({argv!r})\n"
        "import service.app\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_serve_stage_runs_the_real_service(dockerfile, routes):
    _, stages = dockerfile
    serve = stages["serve"]
    entrypoint = exec_form(serve.last("ENTRYPOINT"))
    assert entrypoint == ["cots"]
    assert PYPROJECT["project"]["scripts"]["cots"] == "index_builder.cli:main"
    args = parse_cli(exec_form(serve.last("CMD")))
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert serve.all("EXPOSE") == [str(args.port)]
    assert args.port == serve_default_port()
    port, path = url_of(healthcheck_command(serve))
    assert (port, path) == (args.port, "/health")
    assert "get" in routes[path]
    user = serve.last("USER")
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()


def test_bundle_and_index_are_volumes_not_baked_in(dockerfile):
    args, stages = dockerfile
    for stage in stages.values():
        for step in stage.all("COPY") + stage.all("ADD"):
            raise AssertionError(f"{stage.name} copies files into the image: {step}")
    env = {k: v for s in chain(stages, "serve", args) for k, v in env_of(s).items()}
    check_settings({k: v for k, v in env.items() if k in settings_env()})
    mounts = volumes(stages["serve"])
    assert under(env["COTS_BUNDLE"], mounts) and under(env["COTS_INDEX"], mounts)
    for name, reader in NON_SETTINGS_ENV.items():
        assert name in reader.read_text(), f"{name} is read by nothing"
    cots_env = {k for k in env if k.startswith("COTS_")}
    assert cots_env <= set(settings_env()) | set(NON_SETTINGS_ENV)


def test_trainer_target_rebuilds_indexes(dockerfile):
    args, stages = dockerfile
    trainer = chain(stages, "trainer", args)
    assert installed_profiles(trainer) == ["train"]
    assert "torch" in dist_names(install_profiles()["train"])
    rebuild = parse_rebuild(exec_form(trainer[-1].last("CMD")))
    mounts = volumes(trainer[-1])
    for path in (rebuild.bundle, rebuild.data, rebuild.root):
        assert under(str(path), mounts), path
    assert exec_form(trainer[-1].last("ENTRYPOINT")) == ["cots"]
    assert trainer[-1].last("USER").split(":")[0] not in ("0", "root")


def test_dockerignore_keeps_what_install_needs():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            parts = Path(path).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch(p, pattern) or fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
                result = not negated
        return result

    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], "deploy/install.sh"]
    needed += [p.rstrip("*") + "/__init__.py" for p in packages]
    assert [p for p in needed if ignored(p)] == []
    assert ignored("cots-data/bundles/x/bundle.json") and ignored(".git/HEAD")


def test_cli_bad_input_exit_code_is_two(tmp_path):
    """The CronJob fails at once on exit 2 (bad input); the CLI must mean that by it."""
    code = main(
        [
            "index",
            "rebuild",
            "--bundle",
            str(tmp_path / "none"),
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "index"),
        ]
    )
    assert code == 2
    assert not (tmp_path / "index" / "CURRENT").exists()


# -- docker-compose.yml -------------------------------------------------------------------------


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` with no variable set in the shell (the defaults)."""
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text()))


def compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> mode ("ro" or "rw") of the named volumes a service mounts."""
    found = {}
    for spec in service["volumes"]:
        source, target, *mode = spec.split(":")
        found[target] = mode[0] if mode else "rw"
    return found


def test_compose_service_matches_the_image_and_app(compose, dockerfile, routes):
    _, stages = dockerfile
    search = compose["services"]["search"]
    assert search["build"]["target"] in stages and search["build"]["context"] == ".."
    assert "args" not in search["build"], "the Dockerfile's default base: CUDA"
    args = parse_cli(search["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert [p.split(":")[-1] for p in search["ports"]] == [str(args.port)]
    assert str(args.port) in stages["serve"].all("EXPOSE")
    port, path = url_of(search["healthcheck"]["test"])
    assert (port, path) == (args.port, "/health") and "get" in routes[path]
    devices = search["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = {k: v for k, v in search["environment"].items() if v is not None}
    settings = check_settings(env)
    mounts = compose_mounts(search)
    assert under(str(settings.bundle), list(mounts)) and under(str(settings.index), list(mounts))
    assert set(mounts.values()) == {"ro"}, "the service only reads bundles and indexes"


def test_compose_rebuild_job_writes_what_the_service_reads(compose, dockerfile):
    _, stages = dockerfile
    job, search = compose["services"]["index-rebuild"], compose["services"]["search"]
    assert job["build"]["target"] == "trainer" and "trainer" in stages
    assert job["build"]["args"] == {"BASE_IMAGE": "debian:bookworm-slim"}, "a CPU job"
    assert job["profiles"], "a one-shot job, not started by `up`"
    rebuild = parse_rebuild(job["command"])
    assert str(rebuild.bundle) == search["environment"]["COTS_BUNDLE"]
    assert str(rebuild.root) == search["environment"]["COTS_INDEX"]
    mounts = compose_mounts(job)
    assert under(str(rebuild.data), list(mounts)) and under(str(rebuild.bundle), list(mounts))
    index_mount = next(m for m in mounts if under(str(rebuild.root), [m]))
    assert mounts[index_mount] == "rw"
    declared = set(compose["volumes"])
    for service in (job, search):
        assert {spec.split(":")[0] for spec in service["volumes"]} <= declared
    shared = {s.split(":")[0] for s in job["volumes"]} & {
        s.split(":")[0] for s in search["volumes"]
    }
    assert {"bundles", "indexes"} <= shared


def test_compose_milvus_profile_serves_and_rebuilds_from_milvus(compose):
    """`--profile milvus` starts Milvus standalone (pinned images, health-checked, on etcd and
    MinIO) and, with COTS_BACKEND=milvus, the service and the job both use it. They do not
    depend on it: a dependency on a service of an inactive profile fails podman-compose."""
    services = compose["services"]
    milvus_profile = {n for n, s in services.items() if "milvus" in s.get("profiles", [])}
    assert milvus_profile == {"milvus", "milvus-etcd", "milvus-minio"}
    for name in milvus_profile:
        image = services[name]["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d", tag) and tag != "latest", f"{name}: pin {image}"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
        for spec in services[name]["volumes"]:
            assert spec.split(":")[0] in compose["volumes"]
    milvus = services["milvus"]
    assert milvus["image"] == f"milvusdb/milvus:v{milvus_tested()}"  # what CI tests
    assert {d: c["condition"] for d, c in milvus["depends_on"].items()} == {
        "milvus-etcd": "service_healthy",
        "milvus-minio": "service_healthy",
    }
    env = milvus["environment"]
    assert env["ETCD_ENDPOINTS"].split(":")[0] == "milvus-etcd"
    assert env["MINIO_ADDRESS"].split(":")[0] == "milvus-minio"
    for name in ("search", "index-rebuild"):
        assert "milvus" not in services[name].get("depends_on", {}), "podman-compose: optional"
        chosen = {k: v for k, v in services[name]["environment"].items() if v is not None}
        settings = check_settings({**chosen, "COTS_BACKEND": "milvus"})
        uri = urlparse(settings.milvus_uri)
        assert (uri.hostname, uri.port) == ("milvus", 19530)  # the service name, Milvus's port
        assert settings.backend_config().milvus_collection == settings.milvus_collection
    assert check_settings(env_of_search(compose)).backend == "faiss"  # without the profile
    job = services["index-rebuild"]
    rebuild = parse_with_env(job["command"], {**job["environment"], "COTS_BACKEND": "milvus"})
    served = check_settings({**env_of_search(compose), "COTS_BACKEND": "milvus"})
    assert (rebuild.backend, rebuild.milvus_uri) == ("milvus", served.milvus_uri)
    assert rebuild.milvus_collection == served.milvus_collection


def env_of_search(compose: dict[str, Any]) -> dict[str, str]:
    env = compose["services"]["search"]["environment"]
    return {k: v for k, v in env.items() if v is not None}


def parse_with_env(argv: list[str], env: dict[str, Any]) -> Any:
    """`cots ...` parsed as a container with `env` parses it (`cots index` takes defaults
    from COTS_* variables)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("COTS_")}
    try:
        os.environ.update({k: str(v) for k, v in env.items() if v is not None})
        return parse_rebuild(argv)
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def test_compose_cpu_override_drops_only_the_gpu(compose):
    """docker-compose.cpu.yml: the CPU image on the Debian base, the GPU reservation reset."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: "!reset")
    text = (ROOT / "deploy" / "docker-compose.cpu.yml").read_text()
    (name, cpu), *others = yaml.load(text, Loader)["services"].items()
    assert name == "search" and others == []
    assert cpu["deploy"] == "!reset" and "deploy" in compose["services"]["search"]
    assert cpu["build"] == {
        **compose["services"]["search"]["build"],
        "args": {"BASE_IMAGE": "debian:bookworm-slim"},
    }
    assert cpu["image"] == "cots:cpu"
    assert set(cpu) == {"image", "build", "deploy"}


# -- Kubernetes manifests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s by kind (one object of each kind)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} objects"
            docs[doc["kind"]] = {**doc, "_file": path.name}
    return docs


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def container_env(container: dict[str, Any], k8s: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom, then env over it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
        env.update(k8s["ConfigMap"]["data"])
    secret = k8s["Secret"]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"], f"the Secret has no key {ref['key']}"
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion in command and args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


def mount_paths(container: dict[str, Any], spec: dict[str, Any], claim: str) -> dict[str, bool]:
    """Mount path -> read-only, for the mounts of the PersistentVolumeClaim `claim`."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    found = {}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]].get("persistentVolumeClaim")
        if source:
            assert source["claimName"] == claim
            found[mount["mountPath"]] = bool(mount.get("readOnly"))
    return found


def test_manifests_are_valid_kubernetes(k8s):
    import kubernetes_validate

    for kind, doc in k8s.items():
        if kind != "Kustomization":
            body = {k: v for k, v in doc.items() if k != "_file"}
            kubernetes_validate.validate(body, "1.31", strict=True)
    kustomization = k8s["Kustomization"]
    files = {doc["_file"] for doc in k8s.values()} - {"kustomization.yaml", "secret.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    used = {
        c["image"].split(":")[0]
        for o in k8s.values()
        if "spec" in o and o["kind"] in ("Deployment", "CronJob")
        for c in pod_spec(o)["containers"]
    }
    assert {image["name"] for image in kustomization["images"]} == used


def test_deployment_probes_ports_and_command(k8s, dockerfile, routes):
    _, stages = dockerfile
    deployment = k8s["Deployment"]
    (container,) = pod_spec(deployment)["containers"]
    args = parse_cli(container.get("command", [])[1:] + container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port} and str(args.port) in stages["serve"].all("EXPOSE")
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    for probe in [*probes.values(), container["startupProbe"]["httpGet"]]:
        assert probe["port"] in ports and "get" in routes[probe["path"]]
        # The kubelet sends no API key: a probe route must not need one.
        assert not needs_key(routes[probe["path"]]["get"])
    assert needs_key(routes["/search/text-to-image"]["post"])
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rollout must not drop a ready replica first"


def test_deployment_settings_secret_and_volume(k8s):
    (container,) = pod_spec(k8s["Deployment"])["containers"]
    env = container_env(container, k8s)
    settings = check_settings(env)
    assert settings.api_key is not None and settings.admin_key is not None
    secret_keys = set(k8s["Secret"]["stringData"])
    assert secret_keys <= set(settings_env()), "Secret keys are the variables they set"
    assert all("REPLACE" in v for v in k8s["Secret"]["stringData"].values()), "a template only"
    claim = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    mounts = mount_paths(container, pod_spec(k8s["Deployment"]), claim)
    assert under(str(settings.bundle), list(mounts)) and under(str(settings.index), list(mounts))
    assert all(mounts.values()), "the service mounts the data read-only"
    pod = pod_spec(k8s["Deployment"])["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] != 0


def test_service_routes_to_the_container_port(k8s):
    service, deployment = k8s["Service"], k8s["Deployment"]
    (container,) = pod_spec(deployment)["containers"]
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_cronjob_rebuilds_the_index_the_service_serves(k8s, compose):
    cronjob = k8s["CronJob"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_spec(cronjob)
    (container,) = spec["containers"]
    assert container["image"].split(":")[0] == compose["services"]["index-rebuild"]["image"]
    env = container_env(container, k8s)
    rebuild = parse_rebuild(expand(container.get("command", [])[1:] + container["args"], env))
    (service,) = pod_spec(k8s["Deployment"])["containers"]
    served = check_settings({k: v for k, v in container_env(service, k8s).items()})
    assert (Path(rebuild.bundle), Path(rebuild.root)) == (served.bundle, served.index)
    claim = k8s["PersistentVolumeClaim"]["metadata"]["name"]
    mounts = mount_paths(container, spec, claim)
    for path in (rebuild.bundle, rebuild.data, rebuild.root):
        assert under(str(path), list(mounts))
    assert not any(ro for m, ro in mounts.items() if under(str(rebuild.root), [m]))
    rules = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    assert rules[0]["onExitCodes"]["containerName"] == container["name"]


def test_milvus_overlay_points_service_and_cronjob_at_milvus(k8s):
    """deploy/k8s/milvus: the base plus a ConfigMap patch; the service and the CronJob read
    the same variables and the token from the Secret (optional in the base)."""
    overlay = K8S / "milvus"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "milvus.yaml"]
    (patch_file,) = [p["path"] for p in kustomization["patches"]]
    patch = yaml.safe_load((overlay / patch_file).read_text())
    base = k8s["ConfigMap"]
    assert (patch["kind"], patch["metadata"]["name"]) == ("ConfigMap", base["metadata"]["name"])
    assert base["data"]["COTS_BACKEND"] == "faiss"
    patched = {**k8s, "ConfigMap": {**base, "data": {**base["data"], **patch["data"]}}}
    (service,) = pod_spec(k8s["Deployment"])["containers"]
    settings = check_settings(container_env(service, patched))
    assert settings.backend == "milvus" and settings.milvus_token is not None
    host = urlparse(settings.milvus_uri).hostname or ""
    assert urlparse(settings.milvus_uri).port == 19530
    services = [d for d in yaml.safe_load_all((overlay / "milvus.yaml").read_text())]
    assert host == next(d for d in services if d["kind"] == "Service")["metadata"]["name"]
    cronjob = k8s["CronJob"]
    (container,) = pod_spec(cronjob)["containers"]
    env = container_env(container, patched)
    rebuild = parse_with_env(expand(container.get("command", [])[1:] + container["args"], env), env)
    assert (rebuild.backend, rebuild.milvus_uri) == ("milvus", settings.milvus_uri)
    assert rebuild.milvus_collection == settings.milvus_collection
    for obj in (service, container):
        (token,) = [e for e in obj["env"] if e["name"] == "COTS_MILVUS_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["optional"] is True


# -- docs/deploy.md -----------------------------------------------------------------------------


def test_guide_documents_every_setting_and_real_targets(dockerfile, routes):
    _, stages = dockerfile
    text = (ROOT / "docs" / "deploy.md").read_text()
    table = set(re.findall(r"^\| `(COTS_\w+)` \|", text, re.M))
    assert table == set(settings_env())
    mentioned = set(re.findall(r"\b(COTS_[A-Z_]+)\b", text))
    compose_variables = set(
        re.findall(r"\$\{(COTS_\w+)", (ROOT / "deploy" / "docker-compose.yml").read_text())
    )
    assert mentioned - set(settings_env()) <= set(NON_SETTINGS_ENV) | compose_variables
    assert set(re.findall(r"--target (\w+)", text)) <= set(stages)
    switches = serve_switches()
    for flag in re.findall(r"`(--[a-z-]+)`", text):
        parse_cli(["serve", flag] if flag in switches else ["serve", flag, "1"])
    for path in re.findall(r"localhost:8000(/[\w/-]*)", text):
        assert path in routes, f"the guide uses {path}, which the app does not serve"


# -- Milvus: the version CI tests, the k8s overlay, the systemd units ---------------------------


def milvus_tested() -> str:
    """The Milvus version the tests run the backend on: the `milvus` wheel's pin."""
    pins = [r for r in PYPROJECT["project"]["optional-dependencies"]["milvus"] if "==" in r]
    [pin] = [r.split(";")[0].strip() for r in pins if r.startswith("milvus==")]
    return pin.removeprefix("milvus==")


def test_k8s_milvus_overlay_runs_milvus_standalone_for_the_service(k8s):
    """deploy/k8s/milvus: the base, Milvus standalone (embedded etcd, local storage) and the
    ConfigMap pointing the service and the CronJob at its Service."""
    import kubernetes_validate

    overlay = K8S / "milvus"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == ["..", "milvus.yaml"]
    objs = {d["kind"]: d for d in yaml.safe_load_all((overlay / "milvus.yaml").read_text())}
    for doc in objs.values():
        kubernetes_validate.validate(doc, "1.31", strict=True)
    pod = objs["StatefulSet"]["spec"]["template"]
    assert pod["metadata"]["labels"] == objs["Service"]["spec"]["selector"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == f"milvusdb/milvus:v{milvus_tested()}"
    assert container["command"] == ["milvus", "run", "standalone"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ETCD_USE_EMBED"] == "true" and env["COMMON_STORAGETYPE"] == "local"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    etcd_mount = mounts[env["ETCD_CONFIG_PATH"]]
    config = volumes[etcd_mount["name"]]["configMap"]["name"]
    assert config == objs["ConfigMap"]["metadata"]["name"]
    assert yaml.safe_load(objs["ConfigMap"]["data"][etcd_mount["subPath"]])["listen-client-urls"]
    data = [m for m in mounts.values() if env["ETCD_DATA_DIR"].startswith(m["mountPath"] + "/")]
    claim = volumes[data[0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == objs["PersistentVolumeClaim"]["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ports == {"grpc": 19530, "metrics": 9091}
    patch = yaml.safe_load((overlay / "configmap-patch.yaml").read_text())
    assert patch["metadata"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    settings = check_settings({**k8s["ConfigMap"]["data"], **patch["data"]})
    uri = urlparse(settings.milvus_uri)
    [service_port] = objs["Service"]["spec"]["ports"]
    assert (settings.backend, uri.hostname) == ("milvus", objs["Service"]["metadata"]["name"])
    assert uri.port == service_port["port"] and service_port["targetPort"] == "grpc"


def systemd_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (a key such as Environment= may repeat)."""
    unit: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "systemd" / name).read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
        elif line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{name}: {line!r}"
            section.setdefault(key, []).append(value)
    return unit


def test_systemd_units_run_milvus_and_the_service_under_one_supervision():
    """deploy/systemd: the local Milvus (`cots milvus start --foreground`) and the search
    service on it, each restarted on failure, the service ordered after Milvus and pointed at
    the port Milvus is started on."""
    from index_builder.backends.milvus import server

    milvus, search = systemd_unit("cots-milvus.service"), systemd_unit("cots-search.service")
    for unit in (milvus, search):
        assert set(unit) == {"Unit", "Service", "Install"}
        assert unit["Service"]["Restart"] == ["on-failure"]
        assert unit["Service"]["User"] == milvus["Service"]["User"]
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "cots-milvus.service" in search["Unit"]["After"][0].split()
    assert search["Unit"]["Wants"] == ["cots-milvus.service"]
    milvus_env, search_env = (
        dict(e.split("=", 1) for e in unit["Service"]["Environment"]) for unit in (milvus, search)
    )
    assert milvus_env["COTS_HOME"] == search_env["COTS_HOME"]
    program, *argv = shlex.split(milvus["Service"]["ExecStart"][0])
    assert program.endswith("/bin/cots")
    args = build_parser_with_milvus().parse_args(argv)
    assert (args.action, args.foreground, args.port) == ("start", True, 19530)
    # systemd waits for the graceful stop (then `stop` kills) before its own SIGKILL
    assert int(milvus["Service"]["TimeoutStopSec"][0]) > server.STOP_GRACE_S
    assert milvus["Service"]["KillMode"] == ["mixed"]  # SIGTERM to `cots` only: it stops Milvus
    serving = {k: v for k, v in search_env.items() if k not in NON_SETTINGS_ENV}
    settings = check_settings({**serving, "COTS_BUNDLE": "/b", "COTS_INDEX": "/i"})
    assert (settings.backend, urlparse(settings.milvus_uri).port) == ("milvus", args.port)
    serve_program, *serve_argv = shlex.split(search["Service"]["ExecStart"][0])
    assert serve_program == program
    assert build_parser().parse_args(serve_argv).command == "serve"
    # the units' install line gives the venv the server (install.sh's milvus extra)
    assert (
        "COTS_WITH_MILVUS=1 bash deploy/install.sh serve"
        in (ROOT / "deploy" / "systemd" / "cots-milvus.service").read_text()
    )
    assert '"${COTS_WITH_MILVUS:-0}" = 1 ]; then pip_install "${editable[@]}" "$here[milvus]"' in (
        INSTALL.read_text()
    )


def build_parser_with_milvus() -> argparse.ArgumentParser:
    """The `cots` parser with the `milvus` command (registered by the entry point in
    pyproject.toml, which an older installed copy of the metadata may not list yet)."""
    from index_builder.backends.milvus import commands

    entry = PYPROJECT["project"]["entry-points"]["cots.commands"]["milvus"]
    assert entry == "index_builder.backends.milvus.commands:register"
    parser = argparse.ArgumentParser(prog="cots")
    commands.register(parser.add_subparsers(dest="command"))
    return parser
