"""Static checks of the Kubernetes manifests (``docker/k8s``): no cluster, no kubectl.

The kustomizations are rendered here by ``render``, a deliberately small kustomize: ``resources``
(files and directories), ``namespace``, ``images`` and ``patches`` given as strategic-merge files,
and nothing else (a kustomization using any other field fails, so the renderer can never silently
skip what the manifests ask for). Built-in kinds are validated against the Kubernetes OpenAPI
schemas that ``kubernetes-validate`` ships (offline, strict: unknown fields fail); KEDA's
ScaledObject and the ServiceMonitor against the schemas in ``schemas/``. Then the cross-references:
selectors, ports, probes, the KEDA stream against ``server/engine/redis/queue.py``, the two Redis
roles, settings names, security context.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.engine.redis.queue import GROUP, QUESTIONS, VIDEOS, RedisJobQueue
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
SCHEMAS = Path(__file__).with_name("schemas")
KUBERNETES_VERSION = "1.30.0"  # the oldest minor still supported upstream when this was written
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
# Strategic merge: lists of these fields merge item by item on the key (Kubernetes' patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
IMAGE = "llamavid-serve"
OVERLAYS = ["base", "overlays/gpu"]


# -- the renderer -----------------------------------------------------------------------------------
def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if match is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[match] = strategic_merge(merged[match], item, None)
        return merged
    return copy.deepcopy(patch)


def identity(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test renderer does not implement {unknown}"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"only strategic-merge patch files are rendered: {patch}"
        for change in load_documents(directory / patch["path"]):
            index = next((i for i, o in enumerate(objects) if identity(o) == identity(change)), None)
            assert index is not None, f"patch {patch['path']} targets missing {identity(change)}"
            objects[index] = strategic_merge(objects[index], change)
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for container in (c for o in objects for c in containers(o)):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    names = [identity(o) for o in objects]
    assert len(names) == len(set(names)), f"{directory}: duplicate objects"
    return objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [] if spec is None else spec.get("containers", []) + spec.get("initContainers", [])


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[dict[str, Any]]:
    return render(K8S / request.param)


@pytest.fixture(scope="module")
def gpu() -> dict[tuple[str, str], dict[str, Any]]:
    return {identity(o): o for o in render(K8S / "overlays/gpu")}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if identity(o) == (kind, name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def env_of(obj: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The worker's or API's environment: its ConfigMaps, then its own ``env`` (which wins)."""
    (container,) = [c for c in containers(obj) if c["image"].startswith(IMAGE)]
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return values


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and labels.get(expression["key"]) in expression["values"]:
            return False
        if expression["operator"] == "Exists" and not present:
            return False
        if expression["operator"] == "DoesNotExist" and present:
            return False
    return True


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if pod_spec(o) is not None]


# -- the renderer itself ----------------------------------------------------------------------------
def test_strategic_merge_merges_named_lists_and_replaces_the_rest():
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["x"]}],
                     "tolerations": [{"key": "k"}]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}],
                                      "args": ["y"]}, {"name": "b"}], "tolerations": [{"key": "z"}]}}
    merged = strategic_merge(base, patch)
    assert merged["spec"]["containers"][0]["env"] == [{"name": "X", "value": "2"}, {"name": "Y", "value": "3"}]
    assert merged["spec"]["containers"][0]["args"] == ["y"]
    assert [c["name"] for c in merged["spec"]["containers"]] == ["a", "b"]
    assert merged["spec"]["tolerations"] == [{"key": "z"}]
    assert base["spec"]["containers"][0]["env"][0]["value"] == "1", "the base is not modified"


# -- schemas ----------------------------------------------------------------------------------------
def test_built_in_kinds_match_the_kubernetes_schemas(rendered):
    errors = []
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{identity(obj)}: {str(error).splitlines()[0]}")
    assert not errors, "\n".join(errors)


def test_custom_resources_match_their_schemas(gpu):
    kinds = set()
    for obj in gpu.values():
        name = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if name is None:
            continue
        schema = json.loads((SCHEMAS / name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        errors = [f"{identity(obj)} {list(e.absolute_path)}: {e.message}"
                  for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
        assert not errors, "\n".join(errors)
        kinds.add(obj["kind"])
    assert kinds == {"ScaledObject", "ServiceMonitor"}


def test_the_crd_schemas_refuse_mistakes():
    schema = json.loads((SCHEMAS / "keda-scaledobject.json").read_text())
    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "w"},
            "spec": {"scaleTargetRef": {"name": "w"}, "triggers": [{"type": "redis-streams", "metadata": {
                "address": "r:6379", "stream": "s", "consumerGroup": "g", "pendingEntriesCount": "8"}}]}}
    jsonschema.validate(good, schema)
    for broken in ({"pendingEntriesCount": 8}, {"streamLength": "4"}, {"consumerGroupp": "g"}):
        bad = copy.deepcopy(good)
        bad["spec"]["triggers"][0]["metadata"].update(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# -- what the deployment is made of ---------------------------------------------------------------
def test_the_base_and_the_gpu_overlay_start_the_same_services():
    base = {identity(o) for o in render(K8S / "base")}
    overlay = {identity(o) for o in render(K8S / "overlays/gpu")}
    assert base <= overlay
    assert overlay - base == {("PersistentVolumeClaim", "llamavid-models"), ("ScaledObject", "llamavid-worker"),
                              ("ServiceMonitor", "llamavid-api"), ("ServiceMonitor", "llamavid-worker")}
    for expected in [("Deployment", "llamavid-api"), ("Service", "llamavid-api"),
                     ("HorizontalPodAutoscaler", "llamavid-api"), ("Deployment", "llamavid-worker"),
                     ("StatefulSet", "redis-queue"), ("Deployment", "redis-cache"),
                     ("PodDisruptionBudget", "llamavid-api"), ("PodDisruptionBudget", "llamavid-worker")]:
        assert expected in base, expected


def test_everything_lives_in_one_namespace(rendered):
    (namespace,) = by_kind(rendered, "Namespace")
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], identity(obj)


def test_selectors_ports_and_probes_line_up(rendered):
    pods = [(o, o["spec"]["template"]["metadata"]["labels"]) for o in workloads(rendered)]
    for obj, labels in pods:
        assert selects(obj["spec"]["selector"], labels), f"{identity(obj)} does not select its own pods"
        for container in containers(obj):
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = container.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    if kind in action:
                        port = action[kind]["port"]
                        assert port in ports or port in ports.values(), f"{identity(obj)} {probe} port {port}"
            annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
            if "prometheus.io/port" in annotations:
                assert int(annotations["prometheus.io/port"]) in ports.values(), identity(obj)
    for service in by_kind(rendered, "Service"):
        targets = [(o, labels) for o, labels in pods if selects({"matchLabels": service["spec"]["selector"]}, labels)]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        names = {p.get("name") for c in containers(targets[0][0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {service['metadata']['name']}: {port['targetPort']}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind(rendered, kind):
            selector = obj["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert any(selects(selector, labels) for _, labels in pods), identity(obj)
    for pod_template in workloads(rendered):  # every pod is covered by a NetworkPolicy
        labels = pod_template["spec"]["template"]["metadata"]["labels"]
        assert any(selects(p["spec"]["podSelector"], labels) for p in by_kind(rendered, "NetworkPolicy"))


def test_the_api_scales_on_cpu_and_keeps_one_pod_through_disruptions(rendered):
    hpa = one(rendered, "HorizontalPodAutoscaler", "llamavid-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "llamavid-api")
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    api = one(rendered, "Deployment", "llamavid-api")
    (container,) = containers(api)
    assert container["args"] == ["api"] and "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert one(rendered, "PodDisruptionBudget", "llamavid-api")["spec"]["minAvailable"] >= 1


def test_pods_run_as_non_root_on_a_read_only_root(rendered):
    for obj in workloads(rendered):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, identity(obj)
        assert spec["securityContext"]["runAsUser"] >= 10000, identity(obj)
        assert spec.get("automountServiceAccountToken") is False, identity(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for container in containers(obj):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, identity(obj)
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            for mount in mounts.values():
                volume = volumes.get(mount["name"])
                assert volume is not None or mount["name"] in claims, f"{identity(obj)}: {mount['name']}"
                if volume is not None and "persistentVolumeClaim" in volume:
                    assert mount.get("readOnly") is True, f"{identity(obj)} mounts {mount['name']} writable"
            if container["image"].startswith(IMAGE):  # the image's writable paths are emptyDirs
                for path in ("/tmp", "/var/lib/llamavid"):
                    assert "emptyDir" in volumes[mounts[path]["name"]], f"{identity(obj)}: {path}"


def test_images_are_pinned(rendered):
    for container in (c for o in rendered for c in containers(o)):
        name, _, tag = container["image"].partition(":")
        assert tag and tag != "latest", container["image"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert any(c["image"] == f"{IMAGE}:{version}" for o in rendered for c in containers(o))


# -- the two Redis roles ----------------------------------------------------------------------------
def redis_args(workload: dict[str, Any]) -> dict[str, str]:
    (container,) = containers(workload)
    args = container["args"]
    return {flag: args[i + 1] for i, flag in enumerate(args) if flag.startswith("--")}


def service_url(objects: list[dict[str, Any]], url: str) -> dict[str, Any]:
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", url)
    assert match, url
    service = one(objects, "Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    return service


def test_queue_and_cache_are_two_redis_with_their_policies(rendered):
    config = one(rendered, "ConfigMap", "llamavid-config")["data"]
    queue = service_url(rendered, config["LLAMAVID_REDIS_URL"])
    cache = service_url(rendered, config["LLAMAVID_CACHE_REDIS_URL"])
    assert queue is not cache
    statefulset = one(rendered, "StatefulSet", queue["metadata"]["name"])
    assert statefulset["spec"]["serviceName"] == queue["metadata"]["name"]
    assert redis_args(statefulset)["--maxmemory-policy"] == "noeviction"
    assert redis_args(statefulset)["--appendonly"] == "yes"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (container,) = containers(statefulset)
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    cached = one(rendered, "Deployment", cache["metadata"]["name"])
    assert redis_args(cached)["--maxmemory-policy"] == "allkeys-lru"
    assert redis_args(cached)["--appendonly"] == "no"
    for redis in (statefulset, cached):
        (container,) = containers(redis)
        assert selects(redis["spec"]["selector"], {**redis["spec"]["template"]["metadata"]["labels"]})
        maxmemory = int(redis_args(redis)["--maxmemory"].removesuffix("gb"))
        limit = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
        assert limit > maxmemory, "Redis needs room beyond its maxmemory (fragmentation, buffers)"


def test_settings_in_the_manifests_are_real_settings(rendered):
    fields = set(Settings.model_fields)
    for obj in workloads(rendered):
        if not any(c["image"].startswith(IMAGE) for c in containers(obj)):
            continue
        env = env_of(obj, rendered)
        for name in env:
            if name.startswith("LLAMAVID_"):
                assert name.removeprefix("LLAMAVID_").lower() in fields, f"{identity(obj)}: unknown {name}"
        Settings(**{k.removeprefix("LLAMAVID_").lower(): v for k, v in env.items() if k.startswith("LLAMAVID_")})


# -- the GPU workers --------------------------------------------------------------------------------
def test_the_gpu_worker(gpu):
    objects = list(gpu.values())
    worker = gpu[("Deployment", "llamavid-worker")]
    (container,) = containers(worker)
    env = env_of(worker, objects)
    assert container["args"] == ["worker"]
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" == resources["requests"]["nvidia.com/gpu"]
    assert env["LLAMAVID_DEVICE"] == "cuda:0" and env["LLAMAVID_DTYPE"] == "float16"
    assert env["LLAMAVID_MODEL"].startswith("/models/")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    port = int(env["LLAMAVID_WORKER_METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    # The memory plan (README, 7B video fp16 on a 24 GiB card) fits the share of the card it may use,
    # and the host memory covers the hot tier with room for the process.
    weights_gib, kv_gib, card_gib = 14.8, 5.3, 24
    assert weights_gib + kv_gib < float(env["LLAMAVID_GPU_MEMORY_UTILIZATION"]) * card_gib
    request = int(resources["requests"]["memory"].removesuffix("Gi")) << 30
    assert request >= int(env["LLAMAVID_CACHE_BYTES"]) + (8 << 30)
    assert int(resources["limits"]["memory"].removesuffix("Gi")) << 30 > request
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(worker)["tolerations"])


def test_keda_scales_workers_on_the_question_stream(gpu):
    objects = list(gpu.values())
    scaled = gpu[("ScaledObject", "llamavid-worker")]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "llamavid-worker")
    assert scaled["spec"]["minReplicaCount"] >= 1, "a worker takes minutes to load"
    env = env_of(gpu[("Deployment", "llamavid-worker")], objects)
    queue = RedisJobQueue(None, env["LLAMAVID_REDIS_NAMESPACE"])  # type: ignore[arg-type]
    triggers = {t["metadata"]["stream"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    assert all(t["type"] == "redis-streams" for t in scaled["spec"]["triggers"])
    questions = triggers[queue.stream(QUESTIONS)]
    assert questions["consumerGroup"] == GROUP
    assert questions["pendingEntriesCount"] == env["LLAMAVID_MAX_RUNNING"]
    assert triggers[queue.stream(VIDEOS)]["consumerGroup"] == GROUP
    queue_service = service_url(objects, env["LLAMAVID_REDIS_URL"])
    db = env["LLAMAVID_REDIS_URL"].rsplit("/", 1)[1]
    host = f"{queue_service['metadata']['name']}.{queue_service['metadata']['namespace']}.svc.cluster.local"
    for metadata in triggers.values():
        assert metadata["address"] == f"{host}:{queue_service['spec']['ports'][0]['port']}"
        assert metadata["databaseIndex"] == db


def test_service_monitors_scrape_the_api_and_the_workers(gpu):
    objects = list(gpu.values())
    scraped = set()
    for monitor in by_kind(objects, "ServiceMonitor"):
        services = [s for s in by_kind(objects, "Service")
                    if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert len(services) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports and endpoint.get("path", "/metrics") == "/metrics"
        scraped.add(services[0]["metadata"]["name"])
    assert scraped == {"llamavid-api", "llamavid-worker"}


def test_the_readme_shows_how_to_deploy():
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -k docker/k8s/overlays/gpu" in readme
