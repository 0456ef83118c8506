"""Static checks of the deployment files in cluster/ and infra/.

Parses every YAML document and asserts what KubeRay, Kubernetes, docker compose and the Ray cluster
launcher need from them; runs cluster/submit.sh against a stub `ray`. Nothing here talks to a cluster,
and the jobs modules are referenced by name only (never imported).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import zoneinfo
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
INFRA = ROOT / "infra"
SUBMIT = CLUSTER / "submit.sh"
JOBS = ("embed", "dedup", "mine", "reembed")

K8S_FILES = [
    "raycluster.yaml",
    *(f"rayjob-{job}.yaml" for job in JOBS),
    "cronjob-reembed.yaml",
    "raycronjob-reembed.yaml",
]
YAML_FILES = sorted(p for d in (CLUSTER, INFRA) for p in [*d.glob("*.yaml"), *d.glob("*.yml")])

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
SPEC_KEY = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
ENTRYPOINT = re.compile(r"^python -m jobs\.(?P<job>[a-z_]+) --spec (?P<spec>\S+)$")


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def dockerfile_ray_version() -> str:
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert m, "infra/Dockerfile must pin ARG RAY_VERSION"
    return m.group(1)


# --------------------------------------------------------------------------------------- cron syntax

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
CRON_FIELDS = (  # (name, low, high, names) as Kubernetes' parser (robfig/cron ParseStandard) has them
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i for i, m in enumerate(MONTHS, start=1)}),
    ("day of week", 0, 6, {d: i for i, d in enumerate(WEEKDAYS)}),
)
CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(schedule: str) -> list[str]:
    """Problems with a 5-field cron expression; empty when valid."""
    if schedule.strip().lower() in CRON_MACROS:
        return []
    fields = schedule.split()
    if len(fields) != 5:
        return [f"expected 5 fields, got {len(fields)}"]
    errors = []
    for text, (name, low, high, names) in zip(fields, CRON_FIELDS, strict=True):

        def value(tok: str, name=name, low=low, high=high, names=names) -> int:
            tok = tok.lower()
            if tok in names:
                return names[tok]
            if not tok.isdigit():
                raise ValueError(f"{name}: {tok!r} is not a number or name")
            if not low <= int(tok) <= high:
                raise ValueError(f"{name}: {tok} outside {low}-{high}")
            return int(tok)

        for item in text.split(","):
            try:
                base, _, step = item.partition("/")
                if _ and (not step.isdigit() or int(step) == 0):
                    raise ValueError(f"{name}: bad step {step!r}")
                if base == "*":
                    continue
                lo, dash, hi = base.partition("-")
                if dash and value(lo) > value(hi):
                    raise ValueError(f"{name}: range {base} runs backwards")
                if not dash:
                    value(lo)
            except ValueError as e:
                errors.append(str(e))
    return errors


@pytest.mark.parametrize(
    "schedule",
    ["0 2 * * *", "*/15 0-6,22-23 * JAN-mar mon-fri", "5 4 1,15 */2 SUN", "@daily", "0-59/5 * * * *"],
)
def test_cron_validator_accepts(schedule):
    assert cron_errors(schedule) == []


@pytest.mark.parametrize(
    "schedule",
    [
        "60 2 * * *",
        "0 24 * * *",
        "0 2 0 * *",
        "0 2 * 13 *",
        "0 2 * * 7",
        "0 2 * *",
        "0 2 * * * *",
        "*/0 * * * *",
        "5-1 * * * *",
        "0 2 * foo *",
        "0 2 * * mon-",
        "a b c d e",
        "",
    ],
)
def test_cron_validator_rejects(schedule):
    assert cron_errors(schedule)


# ------------------------------------------------------------------------------------------ all YAML


def test_expected_files_exist():
    for name in [*K8S_FILES, "cluster-launcher.yaml", "submit.sh", "README.md"]:
        assert (CLUSTER / name).is_file(), name
    for name in ["Dockerfile", "docker-compose.yml", "README.md"]:
        assert (INFRA / name).is_file(), name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path):
    assert load(path), f"{path.name} has no YAML documents"


@pytest.mark.parametrize("name", K8S_FILES)
def test_every_k8s_document_is_identified(name):
    for doc in load(CLUSTER / name):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        meta_name = (doc.get("metadata") or {}).get("name")
        assert isinstance(meta_name, str) and DNS1123.match(meta_name) and len(meta_name) <= 63, (
            f"{name}: {doc['kind']} metadata.name {meta_name!r}"
        )


# --------------------------------------------------------------------------------- Ray on Kubernetes


def containers(template: dict) -> list[dict]:
    found = template["spec"]["containers"]
    assert found and all(c.get("name") and c.get("image") for c in found), template
    return found


def check_aws_from_secret(container: dict) -> None:
    from_secret = any("secretRef" in e for e in container.get("envFrom", []))
    for env in container.get("env", []):
        if env["name"].startswith("AWS_") and ("KEY" in env["name"] or "TOKEN" in env["name"]):
            assert "secretKeyRef" in env.get("valueFrom", {}), f"{env['name']} must come from a Secret"
            from_secret = True
    assert from_secret, f"container {container['name']} gets no AWS credentials from a Secret"


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == dockerfile_ray_version(), "rayVersion must match infra/Dockerfile"
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values must be strings"
    assert params["dashboard-host"] == "0.0.0.0"
    assert params["num-cpus"] == "0", "no work may land on the head"
    for c in containers(head["template"]):
        check_aws_from_secret(c)
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), "head has no GPU"

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())
        for c in containers(group["template"]):
            check_aws_from_secret(c)
            res = c["resources"]
            assert res.get("requests") and res.get("limits"), f"{group['groupName']}: requests and limits"
    gpu = [g for g in groups if g["groupName"] == "gpu-workers"]
    assert len(gpu) == 1, "one worker group named gpu-workers"
    for c in containers(gpu[0]["template"]):
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def check_ray_job(job: dict, docs: list[dict], expected_job: str) -> None:
    spec = job["spec"]
    m = ENTRYPOINT.match(spec["entrypoint"].strip())
    assert m, f"entrypoint {spec['entrypoint']!r} is not `python -m jobs.<job> --spec <path>`"
    assert m["job"] in JOBS and m["job"] == expected_job, m["job"]  # jobs/<job>.py runs it
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    check_ray_cluster_spec(cluster)

    # The driver runs on the head: the spec path must lie in a volume mounted there from a ConfigMap
    # that this same file defines, under the key named by the path.
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head_pod.get("volumes", [])}
    spec_path = Path(m["spec"])
    mounts = [
        vm
        for c in head_pod["containers"]
        for vm in c.get("volumeMounts", [])
        if Path(vm["mountPath"]) == spec_path.parent
    ]
    assert len(mounts) == 1, f"{spec_path} is not under exactly one volumeMount of the head"
    configmap_name = volumes[mounts[0]["name"]]["configMap"]["name"]
    configmaps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    assert configmap_name in configmaps, f"ConfigMap {configmap_name} is not in the same file"
    text = configmaps[configmap_name]["data"][spec_path.name]
    check_job_spec(yaml.safe_load(text), expected_job)


def check_job_spec(spec: dict, job: str) -> None:
    assert isinstance(spec, dict) and spec, "the spec must be a YAML mapping"
    bad = [k for k in spec if not (isinstance(k, str) and SPEC_KEY.match(k))]
    assert not bad, f"spec keys must be lowercase_with_underscores (CLI flags with - as _): {bad}"
    assert spec.get("input") and spec.get("output"), "every job reads input and writes output"
    if job in ("embed", "mine", "reembed"):
        assert spec.get("model"), f"{job} needs a model"
    assert spec.get("progress") is False, "a job log gets a line per committed shard, not a progress bar"


def test_raycluster():
    docs = load(CLUSTER / "raycluster.yaml")
    clusters = by_kind(docs, "RayCluster")
    assert len(clusters) == 1 and clusters[0]["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(clusters[0]["spec"])


@pytest.mark.parametrize("job", JOBS)
def test_rayjob(job):
    docs = load(CLUSTER / f"rayjob-{job}.yaml")
    jobs = by_kind(docs, "RayJob")
    assert len(jobs) == 1 and jobs[0]["apiVersion"] == "ray.io/v1"
    check_ray_job(jobs[0], docs, job)


def test_reembed_cronjob():
    docs = load(CLUSTER / "cronjob-reembed.yaml")
    (cron,) = by_kind(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron_errors(cron["spec"]["schedule"]) == []
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"

    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (launcher,) = pod["containers"]
    script = " ".join(launcher.get("command", []) + launcher.get("args", []))
    assert "kubectl create -f" in script, "generateName needs `kubectl create`, not apply"

    # RBAC: the pod's ServiceAccount may create and get rayjobs.ray.io, nothing needs more.
    sa = pod["serviceAccountName"]
    assert sa in {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    roles = {d["metadata"]["name"]: d for d in by_kind(docs, "Role")}
    (binding,) = by_kind(docs, "RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]
    assert all(s.get("namespace") for s in binding["subjects"]), "ServiceAccount subjects need a namespace"
    rules = roles[binding["roleRef"]["name"]]["rules"]
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and {"create", "get"} <= set(r["verbs"])
        for r in rules
    )

    # The RayJob it creates comes from a ConfigMap mounted into the pod, with a fresh name per run.
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = launcher["volumeMounts"]
    configmaps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    manifest = configmaps[volumes[mount["name"]]["configMap"]["name"]]["data"]
    m = re.search(r"kubectl create -f (\S+)", script)
    rayjob = yaml.safe_load(manifest[Path(m[1]).name])
    assert Path(m[1]).parent == Path(mount["mountPath"])
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"].endswith("-")
    check_ray_job(rayjob, docs, "reembed")


# ------------------------------------------------------------------- KubeRay CRD schema (strict)

# KubeRay v1.7.0's RayCronJob openAPIV3Schema; see tests/data/kuberay/README.md for its source.
RAYCRONJOB_SCHEMA = ROOT / "tests" / "data" / "kuberay" / "raycronjob-v1.7.0.schema.json"
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# What the API server accepts in a manifest's own metadata (ObjectMeta fields a manifest may set).
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def raycronjob_schema() -> dict:
    return json.loads(RAYCRONJOB_SCHEMA.read_text())


def schema_errors(value, schema: dict, path: str = "") -> list[str]:
    """Where ``value`` breaks a Kubernetes structural schema, strictly: a field the schema does not define
    is an error (kubectl --validate=strict refuses it; the API server would drop it silently) unless the
    schema preserves unknown fields. Checks type, properties, additionalProperties, required, enum, pattern,
    lengths, minimum, int32/int64 ranges, int-or-string, list-type map/set uniqueness. A CEL rule
    (x-kubernetes-validations) cannot be evaluated here: a value that reaches one is reported, so that it
    is checked by hand."""
    where = path or "(root)"
    errors = [
        f"{where}: CEL rule not checked here: {rule['rule']}"
        for rule in schema.get("x-kubernetes-validations", [])
    ]
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
            return [*errors, f"{where}: expected an integer or a string, got {value!r}"]
    elif "anyOf" in schema and not any(not schema_errors(value, option, path) for option in schema["anyOf"]):
        errors.append(f"{where}: {value!r} matches none of {schema['anyOf']}")
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [*errors, f"{where}: expected an object, got {value!r}"]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{path}.{key}")
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                errors.append(
                    f"{path}.{key}: unknown field (known: {', '.join(sorted(properties)) or 'none'})"
                )
        errors += [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
    elif kind == "array":
        if not isinstance(value, list):
            return [*errors, f"{where}: expected a list, got {value!r}"]
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{i}]")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type in ("map", "set"):
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [
                tuple(item.get(k) for k in keys)
                if list_type == "map" and isinstance(item, dict)
                else repr(item)
                for item in value
            ]
            if len(set(seen)) != len(seen):
                errors.append(
                    f"{where}: duplicate {'keys ' + str(keys) if keys else 'items'} in a list-type {list_type}"
                )
    elif kind == "string" or (schema.get("x-kubernetes-int-or-string") and isinstance(value, str)):
        if not isinstance(value, str):
            return [*errors, f"{where}: expected a string, got {value!r}"]
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: length {len(value)} outside the schema's limits")
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [*errors, f"{where}: expected an integer, got {value!r}"]
        low, high = {"int32": INT32, "int64": INT64}.get(schema.get("format"), (None, None))
        if low is not None and not low <= value <= high:
            errors.append(f"{where}: {value} is outside {schema['format']}")
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below the minimum {schema['minimum']}")
    elif kind == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [*errors, f"{where}: expected a number, got {value!r}"]
    elif kind == "boolean" and not isinstance(value, bool):
        return [*errors, f"{where}: expected true or false, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    return errors


def resource_errors(doc: dict, schema: dict) -> list[str]:
    """A whole custom resource: its body against the CRD's schema, its metadata against ObjectMeta."""
    body = {k: v for k, v in doc.items() if k != "metadata"}
    return schema_errors(doc.get("metadata", {}), OBJECT_META, ".metadata") + schema_errors(body, schema)


def rayjob_spec_schema() -> dict:
    """KubeRay's RayJobSpec, as the RayCronJob CRD embeds it (spec.jobTemplate)."""
    return raycronjob_schema()["properties"]["spec"]["properties"]["jobTemplate"]


def kuberay_rayjob_rules(spec: dict) -> list[str]:
    """The RayJob spec checks of KubeRay's ValidateRayJobSpec that apply to these manifests."""
    problems = []
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("ttlSecondsAfterFinished must not be negative")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds must be positive")
    if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    if (spec.get("rayClusterSpec") or {}).get("authOptions", {}).get("enableK8sTokenAuth"):
        problems.append("K8s token auth is not supported for a RayJob")
    return problems


def test_schema_validator_catches_what_kubernetes_refuses():
    schema = raycronjob_schema()
    good = load(CLUSTER / "raycronjob-reembed.yaml")[1]
    assert resource_errors(good, schema) == []

    def errors_after(change) -> list[str]:
        doc = json.loads(json.dumps(good))
        change(doc)
        return resource_errors(doc, schema)

    cluster = lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"]  # noqa: E731
    head = lambda d: cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0]  # noqa: E731
    cases = {
        "unknown top-level spec field": (
            lambda d: d["spec"].update(concurrencyPolicy="Forbid"),
            ".spec.concurrencyPolicy: unknown field",
        ),
        "unknown container field": (
            lambda d: head(d).update(imagePullPolicyy="Always"),
            "imagePullPolicyy: unknown field",
        ),
        "unknown metadata field": (
            lambda d: d["metadata"].update(label={"a": "b"}),
            ".metadata.label: unknown field",
        ),
        "missing schedule": (lambda d: d["spec"].pop("schedule"), ".spec.schedule: required"),
        "string for an integer": (
            lambda d: cluster(d)["workerGroupSpecs"][0].update(replicas="1"),
            "expected an integer, got '1'",
        ),
        "enum": (lambda d: cluster(d)["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
        "quantity pattern": (
            lambda d: head(d)["resources"]["limits"].update(memory="8 GB"),
            "does not match",
        ),
        "int32 range": (
            lambda d: d["spec"]["jobTemplate"].update(activeDeadlineSeconds=2**31),
            "outside int32",
        ),
        "duplicate container names": (
            lambda d: cluster(d)["headGroupSpec"]["template"]["spec"]["containers"].append(dict(head(d))),
            "duplicate keys ['name']",
        ),
        "list for an object": (lambda d: cluster(d).update(headGroupSpec=[]), "expected an object"),
        "a field carrying a CEL rule": (
            lambda d: d["spec"]["jobTemplate"].update(managedBy="ray.io/kuberay-operator"),
            "CEL rule not checked here",
        ),
    }
    for name, (change, message) in cases.items():
        found = errors_after(change)
        assert any(message in e for e in found), (name, found)
    assert errors_after(lambda d: head(d)["resources"]["limits"].update(cpu=2)) == [], (
        "int-or-string takes ints"
    )


def test_raycronjob_matches_the_kuberay_crd():
    """cluster/raycronjob-reembed.yaml against KubeRay 1.7's RayCronJob CRD, strictly (no unknown fields), plus
    the checks KubeRay's controller makes (ValidateRayCronJobSpec) and this project's own rules for a RayJob."""
    docs = load(CLUSTER / "raycronjob-reembed.yaml")
    (cron,) = by_kind(docs, "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert resource_errors(cron, raycronjob_schema()) == []

    # The controller: name short enough for the RayJob (-<minutes>) and its RayCluster; a standard schedule
    # without TZ=; a time zone the operator can load; the RayJob spec rules.
    assert len(cron["metadata"]["name"]) <= 36
    spec = cron["spec"]
    assert (
        spec["schedule"] == "0 2 * * *"
        and cron_errors(spec["schedule"]) == []
        and "TZ" not in spec["schedule"]
    )
    zoneinfo.ZoneInfo(spec["timeZone"])
    assert kuberay_rayjob_rules(spec["jobTemplate"]) == []
    assert spec.get("suspend") is not True, "the nightly run is scheduled"

    # This project's RayJob rules (entrypoint, head mounts the spec from a ConfigMap of this file, versions).
    check_ray_job({"spec": spec["jobTemplate"]}, docs, "reembed")

    # One nightly spec: the same as the CronJob variant's (same ConfigMap name, same content).
    (spec_map,) = by_kind(docs, "ConfigMap")
    cron_maps = {
        d["metadata"]["name"]: d for d in by_kind(load(CLUSTER / "cronjob-reembed.yaml"), "ConfigMap")
    }
    assert spec_map == cron_maps[spec_map["metadata"]["name"]]


def test_rayjob_and_raycluster_specs_match_the_kuberay_schema():
    """Every RayJob spec (rayjob-*.yaml and the CronJob's template) against KubeRay 1.7's RayJobSpec, and
    raycluster.yaml against its RayClusterSpec, as the RayCronJob CRD defines them; strict."""
    job_schema = rayjob_spec_schema()
    found = {}
    for job in JOBS:
        (doc,) = by_kind(load(CLUSTER / f"rayjob-{job}.yaml"), "RayJob")
        found[f"rayjob-{job}.yaml"] = doc
    docs = load(CLUSTER / "cronjob-reembed.yaml")
    for configmap in by_kind(docs, "ConfigMap"):
        for key, text in configmap["data"].items():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                found[f"cronjob-reembed.yaml: {key}"] = doc
    assert len(found) == len(JOBS) + 1
    for where, doc in found.items():
        errors = schema_errors(doc.get("metadata", {}), OBJECT_META, ".metadata")
        errors += schema_errors(doc["spec"], job_schema, ".spec")
        assert errors == [] and kuberay_rayjob_rules(doc["spec"]) == [], (where, errors)
    (raycluster,) = by_kind(load(CLUSTER / "raycluster.yaml"), "RayCluster")
    cluster_schema = job_schema["properties"]["rayClusterSpec"]
    assert schema_errors(raycluster["spec"], cluster_schema, ".spec") == []
    assert schema_errors(raycluster["metadata"], OBJECT_META, ".metadata") == []


# ------------------------------------------------------------------------------ launcher and compose


def test_cluster_launcher():
    (cfg,) = load(CLUSTER / "cluster-launcher.yaml")
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0, "no work lands on the head"
    gpu_types = [
        name
        for name, t in types.items()
        if t.get("resources", {}).get("GPU", 0) >= 1
        or re.match(r"^(g|p)\d", t["node_config"]["InstanceType"])
    ]
    assert gpu_types, "a GPU worker node type"
    for name, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert any("pip install" in c for c in cfg["setup_commands"])
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{dockerfile_ray_version()}-")


def test_cluster_launcher_matches_ray_schema():
    """The schema `ray up` validates against, from the installed Ray (a private module: skip if moved)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray's cluster-launcher schema is not importable")
    (cfg,) = load(CLUSTER / "cluster-launcher.yaml")
    validate_config(prepare_config(cfg))


def test_docker_compose():
    (compose,) = load(INFRA / "docker-compose.yml")
    services = compose["services"]
    assert {"minio", "createbuckets", "ray-head", "ray-worker"} <= set(services)

    minio = services["minio"]
    assert {"9000", "9001"} <= {str(p).rsplit(":", 1)[-1] for p in minio["ports"]}
    assert services["createbuckets"]["image"].startswith("minio/mc")
    assert "minio" in services["createbuckets"]["depends_on"]

    head, worker = services["ray-head"], services["ray-worker"]
    head_cmd = " ".join(head["command"])
    assert "--head" in head_cmd and "--dashboard-host 0.0.0.0" in head_cmd and "--block" in head_cmd
    assert {"8265", "6379"} <= {str(p).rsplit(":", 1)[-1] for p in head["ports"]}
    assert re.search(r"--address[ =]ray-head:6379", " ".join(worker["command"]))
    assert "ray-head" in worker["depends_on"]
    for svc in (head, worker):
        assert svc["build"]["dockerfile"] == "infra/Dockerfile"
        assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert svc["environment"]["RAY_AUTH_MODE"] == "disabled"


def test_dockerfile():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu", text, re.M)
    assert re.search(r"^WORKDIR /app$", text, re.M)
    assert re.search(r"pip install .*--no-cache-dir \.|pip install \.", text)
    assert not re.search(r"^(ENV|ARG)\s+\S*(SECRET|ACCESS_KEY|TOKEN|PASSWORD)", text, re.M | re.I)


# ----------------------------------------------------------------------------------------- submit.sh


def run_submit(*args, cwd=ROOT, env=None):
    return subprocess.run(
        ["bash", str(SUBMIT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


def test_submit_syntax_and_mode():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    assert os.access(SUBMIT, os.X_OK), "cluster/submit.sh must be executable"
    assert "set -euo pipefail" in SUBMIT.read_text()


@pytest.mark.parametrize("args", [(), ("embed",), ("train", "s3://b/spec.yaml"), ("embed", "a", "b", "c")])
def test_submit_usage(args):
    result = run_submit(*args)
    assert result.returncode != 0
    assert "usage: cluster/submit.sh JOB SPEC [RAY_ADDRESS]" in result.stderr


@pytest.fixture
def stub_ray(tmp_path):
    """A `ray` on PATH that records its argv as JSON instead of submitting."""
    log = tmp_path / "argv.json"
    stub = tmp_path / "bin" / "ray"
    stub.parent.mkdir()
    stub.write_text(
        f'#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open("{log}", "w"))\n'
    )
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
        "AWS_SECRET_ACCESS_KEY": "sentinel-secret-value",
        "AWS_ACCESS_KEY_ID": "sentinel-key-id",
    }
    env.pop("RAY_ADDRESS", None)
    return env, log


@pytest.mark.parametrize("job", JOBS)
def test_submit_command_line(stub_ray, job):
    env, log = stub_ray
    # A spec given relative to the caller's directory is passed relative to the uploaded working dir.
    result = run_submit(job, "raycluster.yaml", "http://head:8265", cwd=CLUSTER, env=env)
    assert result.returncode == 0, result.stderr
    argv = json.loads(log.read_text())
    assert argv[:7] == [
        "job",
        "submit",
        "--address",
        "http://head:8265",
        "--working-dir",
        ".",
        "--runtime-env-json",
    ]
    excludes = json.loads(argv[7])["excludes"]
    assert {".git", ".venv"} <= set(excludes)
    assert argv[8:] == ["--", "python", "-m", f"jobs.{job}", "--spec", "cluster/raycluster.yaml"]
    assert not any("sentinel" in a for a in argv), "credentials must not travel on the command line"


def test_submit_default_address_and_url_spec(stub_ray):
    env, log = stub_ray
    assert run_submit("mine", "s3://bucket/specs/mine.yaml", env=env).returncode == 0
    argv = json.loads(log.read_text())
    assert argv[3] == "http://127.0.0.1:8265" and argv[-1] == "s3://bucket/specs/mine.yaml"
    assert run_submit("mine", "s3://b/m.yaml", env={**env, "RAY_ADDRESS": "http://ray:8265"}).returncode == 0
    assert json.loads(log.read_text())[3] == "http://ray:8265"


def test_submit_rejects_spec_outside_repo(stub_ray, tmp_path):
    env, log = stub_ray
    outside = tmp_path / "spec.yaml"
    outside.write_text("input: x\n")
    assert run_submit("embed", str(outside), env=env).returncode != 0
    assert run_submit("embed", "no/such/spec.yaml", env=env).returncode != 0
    assert not log.exists()


# ------------------------------------------------------------------------------------------- secrets

SECRET_NAMES = r"aws_secret_access_key|aws_access_key_id|aws_session_token|minio_root_password|secret_?key"
SECRET_ASSIGNMENT = re.compile(rf"(?i)\b({SECRET_NAMES})\b[\"']?\s*[:=]\s*(?P<value>[^\s#]*)")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def is_placeholder(value: str) -> bool:
    value = value.strip("\"'")
    return value in ("", "...", "|", ">") or value.startswith(("$", "<", "{"))


def secret_findings(text: str) -> list[str]:
    found = [m[0] for m in AWS_KEY_ID.finditer(text)]
    found += [m[0] for m in SECRET_ASSIGNMENT.finditer(text) if not is_placeholder(m["value"])]
    for doc in _safe_yaml_docs(text):
        found += _literal_secret_env(doc)
    return found


def _safe_yaml_docs(text: str) -> list:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return []


def _literal_secret_env(node) -> list[str]:
    """Kubernetes `env: [{name: AWS_SECRET_ACCESS_KEY, value: ...}]` with a literal value."""
    if isinstance(node, list):
        return [f for item in node for f in _literal_secret_env(item)]
    if not isinstance(node, dict):
        return []
    found = [f for v in node.values() for f in _literal_secret_env(v)]
    name = node.get("name")
    if (
        isinstance(name, str)
        and re.fullmatch(SECRET_NAMES, name, re.I)
        and "value" in node
        and not is_placeholder(str(node["value"]))
    ):
        found.append(f"{name}: {node['value']}")
    return found


@pytest.mark.parametrize(
    "text, leaks",
    [
        ("aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", True),
        ("AWS_SECRET_ACCESS_KEY=abc123 ray job submit\n", True),
        ("env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: hunter2\n", True),
        ("key: AKIAIOSFODNN7EXAMPLE\n", True),
        ("AWS_SECRET_ACCESS_KEY: ${MINIO_ROOT_PASSWORD:-minioadmin}\n", False),
        ('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"\n', False),
        ("env:\n  - name: AWS_SECRET_ACCESS_KEY\n    valueFrom: {secretKeyRef: {name: a, key: b}}\n", False),
    ],
)
def test_secret_scanner(text, leaks):
    assert bool(secret_findings(text)) is leaks


def test_no_literal_secrets_in_deployment_files():
    files = [p for d in (CLUSTER, INFRA) for p in sorted(d.rglob("*")) if p.is_file()]
    assert files
    leaks = {str(p.relative_to(ROOT)): f for p in files if (f := secret_findings(p.read_text()))}
    assert not leaks, leaks
