"""The KubeRay manifests under cluster/: schema-valid, strictly, and consistent with the SPO configs.

- Every kustomization (cluster/base, cluster/mlflow, cluster/overlays/*) is rendered by a small
  pure-Python renderer (resources, configMapGenerator without name hashes, patches: merge patches
  on custom resources and JSON 6902 ops). Where ``kubectl`` (with its built-in kustomize) is
  installed, its rendering must equal ours. Standalone manifests (cluster/base/raycluster.yaml)
  are checked as they are.
- RayJob / RayCluster objects are validated against the real KubeRay CRDs in
  ../shared/kuberay-crds/, strictly: every schema object that lists ``properties`` and is not
  ``x-kubernetes-preserve-unknown-fields`` is closed, so an unknown key is an error.
- Built-in kinds (Deployment, Service, PersistentVolumeClaim, ConfigMap, Secret, ...) are
  validated with kubernetes-validate (offline schemas, strict).
- Policy: the head runs no work (num-cpus "0", no GPUs); each role worker group advertises its
  custom resource and tolerates nvidia.com/gpu; no LoadBalancer/NodePort anywhere; token auth from
  a Secret; the mounted SPO config parses with spo_ray.config.load_config and its role resources
  match (and fit) the worker groups.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from spo_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
KUSTOMIZATIONS = sorted(p.parent for p in CLUSTER.rglob("kustomization.yaml"))
STANDALONE = [CLUSTER / "base" / "raycluster.yaml", CLUSTER / "tools" / "models-loader.yaml"]
ROLES = ("sampler", "scorer", "trainer")
RAY_KINDS = {"RayJob", "RayCluster"}
K8S_VERSIONS = ("1.30.0", "1.37.0")  # an older supported cluster and the newest schemas shipped
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAY_NAME = 47  # KubeRay derives pod / service names from these


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CLUSTER)) for p in paths]


# ----------------------------------------------------------------------------- a tiny kustomize


SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches"}


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge_patch(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): what kustomize's strategic merge does on custom resources
    (no patch-merge keys are known for them): mappings merge, lists are replaced, null deletes."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _json6902(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] in ("replace", "add"):
            if isinstance(node, list) and op["op"] == "add":
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                assert op["op"] == "add" or key in node or isinstance(node, list), f"replace of missing {op['path']}"
                node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"JSON 6902 op {op['op']!r} is not supported by the test renderer")
    return obj


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    checks = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(target[k] == v for k, v in checks.items() if k in target)


def render(kdir: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory the way kustomize does for the features cluster/ uses."""
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unsupported = set(kust) - SUPPORTED_KUSTOMIZATION_KEYS
    assert not unsupported, f"{kdir}: keys {unsupported} are not supported by the test renderer; keep overlays simple"
    objects: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        assert "://" not in entry and not entry.startswith(("github.com", "git@")), f"remote base {entry} in {kdir}"
        path = (kdir / entry).resolve()
        objects.extend(render(path) if path.is_dir() else _load_docs(path))
    for gen in kust.get("configMapGenerator", []):
        options = gen.get("options", {})
        assert options.get("disableNameSuffixHash") is True, (
            f"{kdir}: ConfigMap {gen['name']} must set disableNameSuffixHash (the RayJob mounts it by name)"
        )
        data = {}
        for spec in gen.get("files", []):
            key, _, rel = spec.rpartition("=")
            data[key or Path(rel).name] = (kdir / rel).read_text()
        for spec in gen.get("literals", []):
            key, _, value = spec.partition("=")
            data[key] = value
        meta: dict[str, Any] = {"name": gen["name"]}
        for field in ("labels", "annotations"):
            if options.get(field):
                meta[field] = dict(options[field])
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
        behavior = gen.get("behavior", "create")
        same = [i for i, o in enumerate(objects) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            assert not same, f"{kdir}: ConfigMap {gen['name']} already exists"
            objects.append(cm)
        elif behavior == "replace":
            assert len(same) == 1, f"{kdir}: no ConfigMap {gen['name']} to replace"
            objects[same[0]] = cm
        else:
            raise AssertionError(f"{kdir}: configMapGenerator behavior {behavior!r} is not supported by the test renderer")
    for entry in kust.get("patches", []):
        text = (kdir / entry["path"]).read_text() if "path" in entry else entry["patch"]
        patch = yaml.safe_load(text)
        if isinstance(patch, list):
            target = entry["target"]
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            assert hits, f"{kdir}: JSON 6902 patch matches nothing: {target}"
            for i in hits:
                objects[i] = _json6902(objects[i], patch)
        else:
            target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
            hits = [i for i, o in enumerate(objects) if _matches(o, target)]
            assert hits, f"{kdir}: patch matches nothing: {target}"
            for i in hits:
                assert objects[i]["apiVersion"].startswith("ray.io/"), (
                    "merge patches on built-in kinds merge lists by key in kustomize; the test renderer only "
                    "models custom resources (lists replaced whole)"
                )
                body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
                objects[i] = _merge_patch(objects[i], body)
    return objects


def _by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for o in objects:
        key = (o["kind"], o["metadata"]["name"])
        assert key not in out, f"duplicate object {key}"
        out[key] = o
    return out


@cache
def rendered(kdir: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render(kdir))


def all_manifest_sets() -> list[tuple[str, list[dict[str, Any]]]]:
    sets = [(str(k.relative_to(CLUSTER)), list(rendered(k))) for k in KUSTOMIZATIONS]
    sets += [(str(p.relative_to(CLUSTER)), _load_docs(p)) for p in STANDALONE]
    return sets


def ray_cluster_specs(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner object, RayClusterSpec) for every RayJob and RayCluster."""
    out = []
    for o in objects:
        if o["kind"] == "RayJob":
            out.append((o, o["spec"]["rayClusterSpec"]))
        elif o["kind"] == "RayCluster":
            out.append((o, o["spec"]))
    return out


def test_layout():
    assert {str(k.relative_to(CLUSTER)) for k in KUSTOMIZATIONS} >= {
        "base", "mlflow", "overlays/sd15", "overlays/single-node-8gpu",
    }
    for path in STANDALONE:
        assert path.is_file()
    rayjobs = [o for k in KUSTOMIZATIONS for o in rendered(k) if o["kind"] == "RayJob"]
    assert {o["metadata"]["name"] for o in rayjobs} == {"spo-sdxl", "spo-sd15", "spo-sdxl-1node"}


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_renderer_matches_kustomize(kdir):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: overlays checked with the test's own renderer only")
    proc = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip(f"this kubectl has no built-in kustomize: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    theirs = _by_key([d for d in yaml.safe_load_all(proc.stdout) if d])
    ours = _by_key(list(rendered(kdir)))
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert theirs[key] == ours[key], f"{kdir.name}: {key} renders differently from kustomize"


def test_renderer_patch_semantics():
    base = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "a"},
            "spec": {"x": 1, "l": [1, 2], "m": {"k": 1, "j": 2}}}
    merged = _merge_patch(base, {"spec": {"l": [3], "m": {"k": None, "n": 3}}})
    assert merged["spec"] == {"x": 1, "l": [3], "m": {"j": 2, "n": 3}}
    renamed = _json6902(base, [{"op": "replace", "path": "/metadata/name", "value": "b"},
                               {"op": "add", "path": "/spec/l/-", "value": 9}])
    assert renamed["metadata"]["name"] == "b" and renamed["spec"]["l"] == [1, 2, 9]
    assert base["metadata"]["name"] == "a"


# ----------------------------------------------------------------------------- schemas


def close_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Forbid unknown keys: every object schema with ``properties`` (not marked
    x-kubernetes-preserve-unknown-fields) gets additionalProperties: false, recursively."""
    if not isinstance(schema, dict):
        return schema
    if "properties" in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for child in schema["properties"].values():
            close_schema(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            close_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for child in schema.get(key, []):
            close_schema(child)
    return schema


@cache
def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install -e '.[test]')")
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}: strict RayJob/RayCluster schema checks skipped")
    crd = yaml.safe_load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = close_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    validator = crd_validator(obj["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[test]')")
    errors = []
    for version in K8S_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as err:
            errors.append(f"k8s {version}: {err}")
    return errors


# The Prometheus operator's PodMonitor has no schema here (its CRD is not among ../shared): the
# keys spo-ray uses, checked closed, so a typo is still an error.
POD_MONITOR_KEYS = {
    "": {"apiVersion", "kind", "metadata", "spec"},
    "metadata": {"name", "labels", "namespace"},
    "spec": {"jobLabel", "namespaceSelector", "selector", "podMetricsEndpoints"},
    "endpoint": {"port", "interval", "scrapeTimeout", "path", "honorLabels"},
}


def pod_monitor_errors(obj: dict[str, Any]) -> list[str]:
    errors = [f"{where or 'top'}: unknown key {key}" for where, node in (("", obj), ("metadata", obj["metadata"]),
              ("spec", obj["spec"])) for key in node if key not in POD_MONITOR_KEYS[where]]
    if obj["apiVersion"] != "monitoring.coreos.com/v1":
        errors.append(f"apiVersion {obj['apiVersion']}")
    for endpoint in obj["spec"].get("podMetricsEndpoints") or [{}]:
        errors += [f"podMetricsEndpoints: unknown key {k}" for k in endpoint if k not in POD_MONITOR_KEYS["endpoint"]]
        if "port" not in endpoint:
            errors.append("podMetricsEndpoints: an endpoint without a port")
    if not obj["spec"].get("selector", {}).get("matchLabels"):
        errors.append("spec.selector.matchLabels is empty (it would scrape every pod)")
    return errors


@pytest.mark.parametrize("name,objects", all_manifest_sets(), ids=[n for n, _ in all_manifest_sets()])
def test_objects_validate_strictly(name, objects):
    assert objects, f"{name} renders nothing"
    for obj in objects:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "PodMonitor":
            errors = pod_monitor_errors(obj)
        else:
            errors = crd_errors(obj) if obj["kind"] in RAY_KINDS else k8s_errors(obj)
        assert not errors, where + "\n  " + "\n  ".join(errors)


def test_strict_validation_catches_unknown_keys():
    (rayjob,) = [o for o in rendered(CLUSTER / "base") if o["kind"] == "RayJob"]
    assert crd_errors(rayjob) == []
    typo = copy.deepcopy(rayjob)
    typo["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(typo))
    deep = copy.deepcopy(rayjob)
    deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert any("gpus" in e for e in crd_errors(deep))
    (deployment,) = [o for o in rendered(CLUSTER / "mlflow") if o["kind"] == "Deployment"]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert k8s_errors(bad)


# ----------------------------------------------------------------------------- policy helpers


def pyproject_ray_version() -> str:
    (version,) = re.findall(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    return version


def parse_quantity(value: Any) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources a head/worker group advertises, as `ray start --resources` receives
    them: KubeRay appends ``--resources=<value>`` to a bash command line, so the value is unquoted
    the way bash does it (shlex)."""
    out: dict[str, float] = {}
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is not None:
        (arg,) = shlex.split(f"--resources={raw}")
        out.update(json.loads(arg.split("=", 1)[1]))
    for key, value in (group.get("resources") or {}).items():
        if key not in ("CPU", "GPU", "memory"):
            out[key] = float(value)
    return out


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def capacity(group: dict[str, Any]) -> dict[str, float]:
    """What one pod of the group offers to Ray: CPUs, GPUs and custom resources."""
    params = group.get("rayStartParams", {})
    limits = ray_container(group).get("resources", {}).get("limits", {})
    gpus_limit = parse_quantity(limits.get("nvidia.com/gpu", 0))
    if "num-gpus" in params:
        assert float(params["num-gpus"]) == gpus_limit, f"num-gpus {params['num-gpus']} != GPU limit {gpus_limit}"
    cpus = float(params["num-cpus"]) if "num-cpus" in params else parse_quantity(limits["cpu"])
    return {"CPU": cpus, "GPU": gpus_limit, **custom_resources(group)}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(template: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def fits(groups: list[dict[str, Any]], cfg, *, replicas_key: str) -> list[str]:
    """First-fit the job's role actors onto the pods (replicas of each group): problems found."""
    nodes = []
    for group in groups:
        nodes += [dict(capacity(group)) for _ in range(int(group[replicas_key]))]
    problems = []
    for role in ROLES:
        res = getattr(cfg.ray, role)
        demand = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
        for i in range(getattr(cfg.ray, f"num_{role}s")):
            for node in nodes:
                if all(node.get(k, 0) >= v - 1e-9 for k, v in demand.items()):
                    for k, v in demand.items():
                        node[k] -= v
                    break
            else:
                problems.append(f"{role} #{i} {demand} fits on no pod")
    return problems


def config_of(owner: dict[str, Any], objects: list[dict[str, Any]], tmp_path: Path):
    """The SPO config a RayJob's entrypoint reads: (preset, parsed config, raw dict)."""
    argv = shlex.split(owner["spec"]["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"jobs/spo_(sd15|sdxl)\.py", argv[1]), argv
    script = REPO / argv[1]
    assert script.is_file()
    (preset,) = re.findall(r'job_main\("spo", "([^"]+)"\)', script.read_text())
    if "--preset" in argv:
        preset = argv[argv.index("--preset") + 1]
    config_path = argv[argv.index("--config") + 1]
    head = owner["spec"]["rayClusterSpec"]["headGroupSpec"]
    mounts = mounts_of(head["template"], ray_container(head))
    mount_dir = str(Path(config_path).parent)
    assert mount_dir in mounts, f"{config_path} is not on a head volume"
    cm_name = mounts[mount_dir]["configMap"]["name"]
    cms = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    assert cm_name in cms, f"ConfigMap {cm_name} is not part of the rendered manifests"
    text = cms[cm_name]["data"][Path(config_path).name]
    local = tmp_path / f"{owner['metadata']['name']}.yaml"
    local.write_text(text)
    load_config(config_file=local)  # the file alone is a valid config
    return preset, load_config(preset, config_file=local), yaml.safe_load(text)


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize("name,objects", all_manifest_sets(), ids=[n for n, _ in all_manifest_sets()])
def test_ray_cluster_policy(name, objects):
    for owner, spec in ray_cluster_specs(objects):
        where = f"{name}: {owner['kind']}/{owner['metadata']['name']}"
        assert DNS1035.match(owner["metadata"]["name"]) and len(owner["metadata"]["name"]) <= MAX_RAY_NAME, where
        assert spec["rayVersion"] == pyproject_ray_version(), f"{where}: rayVersion != the pinned Ray"
        head, groups = spec["headGroupSpec"], spec["workerGroupSpecs"]
        # The head runs no work and has no GPU.
        assert head["rayStartParams"]["num-cpus"] == "0", where
        assert head["rayStartParams"].get("num-gpus", "0") == "0", where
        for c in head["template"]["spec"]["containers"]:
            for section in ("limits", "requests"):
                assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {}), where
        assert not head.get("tolerations") and not head["template"]["spec"].get("tolerations"), where
        assert custom_resources(head) == {}, f"{where}: the head advertises role resources"
        # The dashboard is cluster-internal.
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
        # Token auth, with the token from a Secret, on every Ray container.
        auth = spec["authOptions"]
        assert auth["mode"] == "token" and auth["secretName"], where
        images = set()
        for group in [head, *groups]:
            # KubeRay rejects resources in both places, and labels in rayStartParams.
            assert not (group.get("resources") and set(group.get("rayStartParams", {})) & {"num-cpus", "num-gpus", "resources"})
            assert "labels" not in group.get("rayStartParams", {})
            container = ray_container(group)
            images.add(container["image"])
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (auth["secretName"], "auth_token"), where
            assert "value" not in env["HF_TOKEN"] and env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], where
            assert env["HF_HOME"]["value"] == "/models/hf", where
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://spo-mlflow:"), where
            mounts = mounts_of(group["template"], container)
            assert mounts["/shared"]["persistentVolumeClaim"]["claimName"] == "spo-shared", where
            assert "persistentVolumeClaim" in mounts["/models"], where
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
        assert len(images) == 1, f"{where}: head and workers must run the same image (same Ray)"
        # One worker group per role, each advertising its custom resource; GPUs are tolerated.
        advertised = set()
        for group in groups:
            custom = custom_resources(group)
            assert custom and set(custom) <= {f"spo_{r}" for r in ROLES}, f"{where}: group {group['groupName']} advertises {custom}"
            advertised |= set(custom)
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], where
            if capacity(group)["GPU"]:
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" for t in tolerations), where
        assert advertised == {f"spo_{r}" for r in ROLES}, f"{where}: role resources advertised: {advertised}"
        if len(groups) > 1:  # one group per role (the single-node overlay has one group for all)
            assert sorted(g["groupName"] for g in groups) == sorted(ROLES), where


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_rayjob_config_matches_worker_groups(kdir, tmp_path):
    objects = list(rendered(kdir))
    rayjobs = [o for o in objects if o["kind"] == "RayJob"]
    for job in rayjobs:
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        preset, cfg, raw = config_of(job, objects, tmp_path)
        assert cfg.model.kind == preset.removeprefix("tiny-")
        groups = spec["rayClusterSpec"]["workerGroupSpecs"]
        advertised = {k for g in groups for k in custom_resources(g)}
        for role in ROLES:
            res = getattr(cfg.ray, role)
            # Each role asks for its own group's resource (and only that one), so it can only land there.
            assert set(res.resources) == {f"spo_{role}"}, f"{job['metadata']['name']}: ray.{role}.resources = {res.resources}"
            assert raw["ray"][role]["resources"] == res.resources  # set by the mounted file, not a preset
            assert res.num_gpus == (0.9 if role == "scorer" else 1), f"ray.{role}.num_gpus"
        # The validation-grid renderer shares a scorer's GPU (and its group).
        assert cfg.ray.renderer.resources == {"spo_scorer": 0.1} and cfg.ray.renderer.num_gpus == 0.1
        assert advertised == {f"spo_{r}" for r in ROLES}
        problems = fits(groups, cfg, replicas_key="replicas")
        assert not problems, f"{job['metadata']['name']}: " + "; ".join(problems)
        # Checkpoints, run dirs and Ray Train's storage on the shared volume; inputs on the models volume.
        assert cfg.run.output_dir.startswith("/shared/")
        for path in (cfg.scorer.clip_dir, cfg.scorer.checkpoint, cfg.data.prompt_file):
            assert path.startswith("/models/"), path  # the CLIP dir loads from disk only
        # As many role GPUs as the job uses: less than one idle per group (the renderer's share).
        total = {r: sum(capacity(g).get(f"spo_{r}", 0) * g["replicas"] for g in groups) for r in ROLES}
        demand = {r: getattr(cfg.ray, f"num_{r}s") * getattr(cfg.ray, r).resources[f"spo_{r}"] for r in ROLES}
        demand["scorer"] += cfg.ray.renderer.resources["spo_scorer"]
        assert all(0 <= total[r] - demand[r] < 1 for r in ROLES), (total, demand)
        gpus = sum(capacity(g)["GPU"] * g["replicas"] for g in groups)
        used = sum(getattr(cfg.ray, f"num_{r}s") * getattr(cfg.ray, r).num_gpus for r in ROLES) + cfg.ray.renderer.num_gpus
        assert 0 <= gpus - used < 1, (gpus, used)


def test_single_node_overlay_puts_all_roles_on_one_8gpu_pod(tmp_path):
    objects = list(rendered(CLUSTER / "overlays" / "single-node-8gpu"))
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 1 and capacity(group)["GPU"] == 8
    assert custom_resources(group) == {"spo_sampler": 4, "spo_scorer": 2, "spo_trainer": 2}
    _, cfg, _ = config_of(job, objects, tmp_path)
    assert (cfg.ray.num_samplers, cfg.ray.num_scorers, cfg.ray.num_trainers) == (4, 2, 2)


def test_interactive_raycluster_runs_every_shipped_config(tmp_path):
    """The autoscaled RayCluster can hold each RayJob variant's roles at maxReplicas."""
    (cluster,) = _load_docs(CLUSTER / "base" / "raycluster.yaml")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = cluster["spec"]["workerGroupSpecs"]
    for kdir in KUSTOMIZATIONS:
        objects = list(rendered(kdir))
        for job in (o for o in objects if o["kind"] == "RayJob"):
            if len(job["spec"]["rayClusterSpec"]["workerGroupSpecs"]) == 1:
                continue  # the single-node layout is its own cluster shape
            _, cfg, _ = config_of(job, objects, tmp_path)
            assert not fits(groups, cfg, replicas_key="maxReplicas"), job["metadata"]["name"]


def test_no_public_services_anywhere():
    for path in CLUSTER.rglob("*.yaml"):
        for doc in _load_docs(path):
            text = json.dumps(doc)
            for public in ("LoadBalancer", "NodePort"):
                assert f'"{public}"' not in text, f"{path}: {public}"
            assert doc.get("kind") not in ("Ingress", "Route", "Gateway", "HTTPRoute"), path


def test_no_secret_values_committed():
    for path in CLUSTER.rglob("*.yaml"):
        for doc in _load_docs(path):
            assert doc.get("kind") != "Secret", f"{path}: create Secrets with kubectl (cluster/README.md), never commit them"
            assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", json.dumps(doc)), f"{path}: a Hugging Face token"


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_references_resolve(kdir):
    """Claims, ConfigMaps and Service selectors point at objects of the same rendering."""
    objects = list(rendered(kdir))
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    templates = []
    for o in objects:
        if o["kind"] == "Deployment":
            templates.append(o["spec"]["template"])
        for _, spec in ray_cluster_specs([o]):
            templates += [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in objects if d["kind"] == "Deployment"
        ), f"Service {svc['metadata']['name']} selects no pod"


def test_mlflow_server_accepts_the_ray_pods_and_port_forward():
    mlflow_security = pytest.importorskip("mlflow.server.security_utils")
    objects = list(rendered(CLUSTER / "mlflow"))
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (service,) = [o for o in objects if o["kind"] == "Service"]
    (pvc,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    allowed = args["allowed-hosts"].split(",")
    (rayjob,) = [o for o in rendered(CLUSTER / "base") if o["kind"] == "RayJob"]
    uri = env_of(ray_container(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]))["MLFLOW_TRACKING_URI"]["value"]
    host = uri.removeprefix("http://")
    assert host == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for h in (host, f"spo-mlflow.spo.svc.cluster.local:{args['port']}", "127.0.0.1:5000", "localhost:5000"):
        assert mlflow_security.is_allowed_host_header(allowed, h), h
    assert not mlflow_security.is_allowed_host_header(allowed, "evil.example.com")
    assert service["spec"]["type"] == "ClusterIP"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # SQLite on a ReadWriteOnce volume
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert args["backend-store-uri"].startswith("sqlite:////mlflow/")


def test_monitoring_scrapes_every_ray_pod_and_the_dashboard_uses_exported_metrics():
    """The PodMonitor selects every Ray pod of every shipped RayJob/RayCluster (head and role
    workers) on a port that each Ray container declares and that rayStartParams exports metrics
    on; the Grafana dashboard (a ConfigMap Grafana's sidecar loads) queries only metric names the
    engine exports (spo_ray.ray.metrics; the Ray job test scrapes them from a live cluster)."""
    from spo_ray.ray.metrics import prometheus_names

    objects = list(rendered(CLUSTER / "monitoring"))
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    (dashboard_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's selector
    wanted = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    groups = [spec["headGroupSpec"] for _, spec in ray_cluster_specs([o for _, objs in all_manifest_sets() for o in objs])]
    groups += [g for _, objs in all_manifest_sets() for _, spec in ray_cluster_specs(objs) for g in spec["workerGroupSpecs"]]
    assert len(groups) >= 8
    for group in groups:
        # KubeRay adds ray.io/is-ray-node=yes to every Ray pod; the rest are the template's labels
        labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        assert wanted.items() <= labels.items(), group.get("groupName", "head")
        ports = {p["name"]: p["containerPort"] for p in ray_container(group).get("ports", [])}
        assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"]

    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["spo-ray-dashboard.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bray_spo_[a-z_]+", expr)}
    assert used and used <= prometheus_names(), used - prometheus_names()
    assert all('run=~"$run"' in expr for expr in exprs)  # every panel follows the run picker
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "run"}


def test_readme_documents_deployment():
    text = (CLUSTER / "README.md").read_text()
    for needle in (
        "create secret generic spo-ray-auth", "auth_token", "spo-hf-token", "apply -k",
        "port-forward", "127.0.0.1:8265", "RAY_AUTH_MODE=token", "ray job submit", "estimate",
        "cluster/rehearsal.sh", "cluster/monitoring",
    ):
        assert needle in text, needle
    for overlay in ("overlays/sd15", "overlays/single-node-8gpu"):
        assert overlay in text
