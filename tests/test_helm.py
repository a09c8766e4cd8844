"""The Helm chart (deploy/helm/unclip) and the images (deploy/docker), checked without a cluster.

With the real helm binary (.tools/bin/helm; `make tools` or `python tools/install_helm.py`):
lint --strict and template every preset, validate every rendered manifest against the Kubernetes
OpenAPI schemas (kubernetes-validate, bundled, offline), the RayService against KubeRay's CRD
schema and the PodMonitor / ServiceMonitor against prometheus-operator's (vendored in
tests/kind/crds/), parse serveConfigV2 with Ray's ServeDeploySchema, check it
mirrors deploy/ray/serve.yaml, and check labels, NetworkPolicies, PDBs, security contexts, the S3
wiring and that values.schema.json rejects bad values. The end-to-end run on a cluster is
tests/kind (make test-kind).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "unclip"
HELM = ROOT / ".tools" / "bin" / "helm"
DOCKER = ROOT / "deploy" / "docker"
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
RAYSERVICE_CRD = ROOT / "tests" / "kind" / "crds" / "ray.io_rayservices.v1.7.0.yaml.gz"
MONITOR_CRDS = {  # their openAPIV3Schema only; provenance in each file's header
    kind: ROOT / "tests" / "kind" / "crds" / f"monitoring.coreos.com_{kind.lower()}s.v0.93.0.schema.yaml"
    for kind in ("PodMonitor", "ServiceMonitor")
}
CRD_API_GROUPS = ("ray.io/", "monitoring.coreos.com/")  # kinds kubernetes-validate has no schema for
PRESETS = {"default": None, "tiny-cpu": "values-tiny-cpu.yaml", "gpu": "values-gpu.yaml"}
K8S_VERSION = "1.33"  # the Kubernetes schemas manifests are validated against (kubernetes-validate bundles them)
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
APPS = ("encoder", "prior", "decoder", "upsampler", "gateway")
SERVICERS = [
    "unclip.v1.encoder_pb2_grpc.add_ClipEncoderServiceServicer_to_server",
    "unclip.v1.prior_pb2_grpc.add_PriorServiceServicer_to_server",
    "unclip.v1.decoder_pb2_grpc.add_DecoderServiceServicer_to_server",
    "unclip.v1.upsampler_pb2_grpc.add_UpsamplerServiceServicer_to_server",
    "unclip.v1.images_pb2_grpc.add_ImageServiceServicer_to_server",
]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():  # `make test` installs it: a missing helm is a broken setup, not a reason to skip
        pytest.fail(f"{HELM.relative_to(ROOT)} is missing: run `make tools` (or `python tools/install_helm.py`)")
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def preset_args(preset: str) -> list[str]:
    values = PRESETS[preset]
    return [] if values is None else ["-f", str(CHART / values)]


def template(*args: str, release: str = "rel", namespace: str = "ns") -> list[dict]:
    out = helm("template", release, str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@cache
def rendered(preset: str) -> tuple[dict, ...]:
    return tuple(template(*preset_args(preset)))


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def rayservice(docs) -> dict:
    (service,) = of_kind(docs, "RayService")
    return service


def serve_config(docs) -> dict:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


def pod_templates(docs) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the release creates, Ray's included."""
    pods = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("StatefulSet", "Deployment"):
            pods.append((name, doc["spec"]["template"]))
        elif doc["kind"] == "Pod":
            pods.append((name, doc))
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            pods.append((f"{name}/head", cluster["headGroupSpec"]["template"]))
            for group in cluster.get("workerGroupSpecs", []):
                pods.append((f"{name}/{group['groupName']}", group["template"]))
    return pods


@cache
def crd_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(RAYSERVICE_CRD.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema):
    """A CRD schema that also refuses unknown fields, as the API server does under strict field
    validation (kubectl's default); otherwise it prunes them silently, so a misspelt field would
    pass a plain CRD schema and be lost."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(sub) for sub in schema[key]]
    return out


@cache
def monitor_schema(kind: str) -> dict:
    return strict(yaml.safe_load(MONITOR_CRDS[kind].read_text()))


def monitor_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(monitor_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


# -- helm lint / template ---------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_lint_strict(preset):
    result = helm("lint", "--strict", str(CHART), *preset_args(preset))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("preset", PRESETS)
def test_manifests_match_kubernetes_schemas(preset):
    import kubernetes_validate

    docs = rendered(preset)
    kinds = {doc["kind"] for doc in docs}
    assert {"RayService", "Service", "NetworkPolicy", "PodDisruptionBudget", "Secret", "StatefulSet", "Pod"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_API_GROUPS):
            continue  # a CRD: checked against its vendored schema below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_rayservice_matches_kuberay_crd(preset):
    service = rayservice(rendered(preset))
    assert service["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(crd_schema()).iter_errors(service), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_crd_schema_catches_mistakes():
    """The vendored CRD schema is strict enough to be worth checking against."""
    service = json.loads(json.dumps(rayservice(rendered("default"))))
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert len(list(jsonschema.Draft7Validator(crd_schema()).iter_errors(service))) == 2


# -- serveConfigV2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_serve_config_shape(preset):
    config = serve_config(rendered(preset))
    assert config["grpc_options"]["port"] == 9000
    assert config["grpc_options"]["grpc_servicer_functions"] == SERVICERS
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == set(APPS)
    for name in APPS:
        assert apps[name]["import_path"] == f"unclip.ray_apps:{name}_app"
        assert apps[name]["deployments"], name
        # Ray 2.60's gRPC proxy routes only to applications with a route prefix. The gateway's
        # OpenAI-compatible HTTP API is at the root (base_url http://<gateway>:8000/v1).
        assert apps[name]["route_prefix"] == ("/" if name == "gateway" else f"/{name}"), name


@pytest.mark.parametrize("preset", PRESETS)
def test_serve_config_passes_ray_schema(preset):
    from ray.serve.schema import ServeDeploySchema

    validated = ServeDeploySchema.model_validate(serve_config(rendered(preset)))
    assert {app.name for app in validated.applications} == set(APPS)
    assert validated.grpc_options.port == 9000


def test_default_serve_config_mirrors_deploy_ray_serve_yaml():
    """The chart's defaults are deploy/ray/serve.yaml, except where a cluster needs otherwise:
    proxies on every node bound to 0.0.0.0."""
    reference = yaml.safe_load(SERVE_YAML.read_text())
    config = serve_config(rendered("default"))
    assert config["grpc_options"] == reference["grpc_options"]
    assert config["http_options"]["port"] == reference["http_options"]["port"]
    assert config["proxy_location"] == "EveryNode" and config["http_options"]["host"] == "0.0.0.0"
    by_name = {app["name"]: app for app in config["applications"]}
    for app in reference["applications"]:
        ours = by_name[app["name"]]
        for key in ("import_path", "route_prefix", "args", "deployments"):
            assert ours.get(key) == app.get(key), (app["name"], key)


@pytest.mark.parametrize("preset", PRESETS)
def test_deployment_names_exist_in_ray_apps(preset):
    """Per-deployment overrides name deployments that unclip.ray_apps defines."""
    source = ROOT / "unclip" / "ray_apps.py"
    defined = set(re.findall(r'@serve\.deployment\(\s*name="(\w+)"', source.read_text()))
    for app in serve_config(rendered(preset))["applications"]:
        assert {d["name"] for d in app["deployments"]} <= defined, app["name"]


def test_tiny_cpu_preset_is_one_replica_each_without_gpus():
    docs = rendered("tiny-cpu")
    for app in serve_config(docs)["applications"]:
        for deployment in app["deployments"]:
            assert deployment["num_replicas"] == 1 and "autoscaling_config" not in deployment
            assert not deployment["ray_actor_options"].get("num_gpus")
        assert app["args"].get("checkpoint") is None  # the weights baked into the image
    assert "nvidia.com/gpu" not in json.dumps(docs)


def test_gpu_preset_requests_gpus_and_mounts_weights():
    docs = rendered("gpu")
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_container = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(groups["cpu"])
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = {
        app["name"]: app["deployments"][0]["ray_actor_options"].get("num_gpus", 0) for app in serve_config(docs)["applications"]
    }
    assert all(0 < gpus[name] < 1 for name in ("prior", "decoder", "upsampler"))
    assert gpus["prior"] + gpus["decoder"] + gpus["upsampler"] <= 1  # one replica of each fits one card
    for app in serve_config(docs)["applications"]:
        if app["name"] != "gateway":
            assert app["args"]["checkpoint"].startswith("/models/")
    for _, pod in pod_templates([rayservice(docs)]):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["weights"]["persistentVolumeClaim"] == {"claimName": "unclip-weights", "readOnly": True}


def test_weights_can_come_from_an_s3_prefix():
    """weights.s3.prefix: every Ray pod pulls the folder into an emptyDir before Ray starts, and
    Ray mounts it read-only where the applications' checkpoints point."""
    import kubernetes_validate

    docs = template("-f", str(CHART / "values-gpu.yaml"), "--set", "weights.existingClaim=", "--set",
                    "weights.s3.prefix=weights/karlo", "--set", "weights.s3.bucket=models")  # fmt: skip
    service = rayservice(docs)
    errors = list(jsonschema.Draft7Validator(crd_schema()).iter_errors(service))
    assert not errors, errors[0].message
    pods = pod_templates([service])
    assert len(pods) == 3  # the head and both worker groups
    for where, pod in pods:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, **pod}, K8S_VERSION, strict=True
        )
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["weights"] == {"name": "weights", "emptyDir": {"sizeLimit": "20Gi"}}, where
        (init,) = pod["spec"]["initContainers"]
        assert init["command"][-7:] == ["weights", "pull", "/models", "--prefix", "weights/karlo", "--bucket", "models"]
        assert {"UNCLIP_S3_ENDPOINT", "UNCLIP_S3_ACCESS_KEY", "UNCLIP_S3_SECRET_KEY"} <= set(_env(init))
        assert {"name": "weights", "mountPath": "/models"} in init["volumeMounts"]
        ray = pod["spec"]["containers"][0]
        assert {"name": "weights", "mountPath": "/models", "readOnly": True} in ray["volumeMounts"]
    refused = helm("template", "rel", str(CHART), "--set", "weights.s3.prefix=w", "--set", "s3.enabled=false", check=False)
    assert refused.returncode != 0 and "set s3.enabled" in refused.stderr
    claim_wins = template("--set", "weights.existingClaim=pvc", "--set", "weights.s3.prefix=w")
    for _, pod in pod_templates([rayservice(claim_wins)]):
        assert "initContainers" not in pod["spec"]


# -- labels, network policies, disruption budgets, security -----------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_standard_labels_everywhere(preset):
    docs = rendered(preset)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert all(key in labels for key in STANDARD_LABELS), (doc["kind"], doc["metadata"]["name"])
        assert labels["app.kubernetes.io/part-of"] == "unclip" and labels["app.kubernetes.io/version"] == "0.1.0"
    for where, pod in pod_templates(docs):
        assert all(key in pod["metadata"]["labels"] for key in STANDARD_LABELS), where


@pytest.mark.parametrize("preset", PRESETS)
def test_network_policies_expose_only_the_gateway(preset):
    docs = rendered(preset)
    policies = {p["metadata"]["name"]: p for p in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {"rel-unclip-ray", "rel-unclip-s3"}
    release = {"app.kubernetes.io/name": "unclip", "app.kubernetes.io/instance": "rel"}

    ray = policies["rel-unclip-ray"]["spec"]
    assert ray["policyTypes"] == ["Ingress"]
    open_rules = [rule for rule in ray["ingress"] if "from" not in rule]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in open_rules] == [[8000, 9000]]  # only the proxies
    assert {"podSelector": {"matchLabels": release}} in ray["ingress"][0]["from"]
    # every Ray pod is covered by the policy
    for where, pod in pod_templates([rayservice(docs)]):
        assert ray["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), where

    s3 = policies["rel-unclip-s3"]["spec"]
    (rule,) = s3["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": release}}]
    assert rule["ports"] == [{"port": 8333, "protocol": "TCP"}]


def test_network_policy_can_be_limited_and_turned_off():
    peer = {"ipBlock": {"cidr": "10.0.0.0/8"}}
    docs = template("--set-json", f"networkPolicy.gatewayFrom=[{json.dumps(peer)}]")
    (ray,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray")]
    assert all("from" in rule for rule in ray["spec"]["ingress"])
    assert not of_kind(template("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


@pytest.mark.parametrize("preset", PRESETS)
def test_disruption_budgets(preset):
    docs = rendered(preset)
    budgets = {b["metadata"]["name"]: b["spec"] for b in of_kind(docs, "PodDisruptionBudget")}
    groups = [g["groupName"] for g in rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert set(budgets) == {f"rel-unclip-worker-{g}" for g in groups} | {"rel-unclip-s3"}
    pods = dict(pod_templates(docs))
    for group in groups:
        selector = budgets[f"rel-unclip-worker-{group}"]["selector"]["matchLabels"]
        assert selector.items() <= pods[f"RayService/rel-unclip/{group}"]["metadata"]["labels"].items()
        assert budgets[f"rel-unclip-worker-{group}"]["maxUnavailable"] == 1


@pytest.mark.parametrize("preset", PRESETS)
def test_pods_run_unprivileged_with_resources(preset):
    for where, pod in pod_templates(rendered(preset)):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            assert not container["image"].endswith(":latest") and ":" in container["image"], where


# -- services, S3 -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_gateway_service_exposes_grpc_9000_on_serve_proxies(preset):
    docs = rendered(preset)
    services = {s["metadata"]["name"]: s["spec"] for s in of_kind(docs, "Service")}
    gateway = services["rel-unclip-gateway"]
    ports = {p["name"]: p for p in gateway["ports"]}
    assert ports["grpc"]["port"] == 9000 and ports["grpc"]["targetPort"] == "serve-grpc"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] == "serve"  # the OpenAI-compatible API
    assert ports["http"]["appProtocol"] == "http"
    assert gateway["selector"]["ray.io/serve"] == "true"
    for where, pod in pod_templates([rayservice(docs)]):
        assert gateway["selector"].items() - {("ray.io/serve", "true")} <= pod["metadata"]["labels"].items(), where
        named = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert named["serve-grpc"] == 9000 and named["serve"] == 8000, where


def notes(*args: str) -> str:
    """The release notes `helm install` prints (helm template leaves NOTES.txt out)."""
    out = helm("install", "rel", str(CHART), "--namespace", "ns", "--dry-run=client", *args).stdout
    return out.split("\nNOTES:\n", 1)[1]


def test_notes_point_openai_clients_at_the_http_port():
    text = notes()
    assert 'openai.OpenAI(base_url="http://127.0.0.1:8000/v1"' in text
    assert "not under Ray" not in text
    moved = notes("--set", "serve.applications.gateway.routePrefix=/images-api", "--set", "gateway.service.httpPort=8080")
    assert 'base_url="http://127.0.0.1:8080/images-api/v1"' in moved


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_s3_in_cluster_wiring():
    docs = rendered("default")
    (secret,) = of_kind(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    identities = json.loads(data["s3.json"])["identities"]
    assert identities[0]["credentials"] == [{"accessKey": data["accessKey"], "secretKey": data["secretKey"]}]
    (statefulset,) = of_kind(docs, "StatefulSet")
    weed = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert weed["image"] == "chrislusf/seaweedfs:4.48" and weed["command"] == ["weed"]
    assert {"server", "-s3", "-s3.port=8333", "-s3.config=/etc/seaweedfs/s3.json"} <= set(weed["args"])
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    for where, pod in pod_templates([rayservice(docs)]):
        env = _env(pod["spec"]["containers"][0])
        assert env["UNCLIP_S3_ENDPOINT"] == "rel-unclip-s3.ns.svc:8333", where
        assert env["UNCLIP_S3_ACCESS_KEY"] == {"secretKeyRef": {"name": "rel-unclip-s3", "key": "accessKey"}}
        assert env["UNCLIP_S3_SECRET_KEY"] == {"secretKeyRef": {"name": "rel-unclip-s3", "key": "secretKey"}}
        assert env["UNCLIP_S3_BUCKET"] == "unclip" and env["UNCLIP_S3_SECURE"] == "false"
        assert "UNCLIP_S3_PUBLIC_ENDPOINT" not in env


def test_s3_external_endpoint_and_given_credentials():
    docs = template(
        "--set", "s3.internal.enabled=false", "--set", "s3.external.endpoint=s3.example.com:443", "--set", "s3.secure=true",
        "--set", "s3.publicEndpoint=images.example.com", "--set", "s3.accessKey=AKEXAMPLE", "--set", "s3.secretKey=sekret",
    )  # fmt: skip
    assert not of_kind(docs, "StatefulSet")
    assert {p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")} == {"rel-unclip-ray"}
    (secret,) = of_kind(docs, "Secret")
    assert base64.b64decode(secret["data"]["accessKey"]) == b"AKEXAMPLE" and "s3.json" not in secret["data"]
    env = _env(rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert env["UNCLIP_S3_ENDPOINT"] == "s3.example.com:443" and env["UNCLIP_S3_SECURE"] == "true"
    assert env["UNCLIP_S3_PUBLIC_ENDPOINT"] == "images.example.com"


def test_s3_existing_secret_and_disabled_store():
    docs = template("--set", "s3.existingSecret=my-s3")
    assert not of_kind(docs, "Secret")
    env = _env(rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert env["UNCLIP_S3_SECRET_KEY"] == {"secretKeyRef": {"name": "my-s3", "key": "secretKey"}}
    docs = template("--set", "s3.enabled=false")
    assert not of_kind(docs, "Secret") and not of_kind(docs, "StatefulSet")
    env = _env(rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert not any(name.startswith("UNCLIP_S3_") for name in env)


def test_external_s3_needs_an_endpoint():
    result = helm("template", "rel", str(CHART), "--set", "s3.internal.enabled=false", check=False)
    assert result.returncode != 0 and "s3.external.endpoint is required" in result.stderr


# -- metrics: Ray's endpoint, PodMonitor / ServiceMonitor, the scrape rule ---------------------


def ray_nodes(docs) -> list[tuple[str, dict, dict]]:
    """(where, rayStartParams, pod template) for the head and every worker group."""
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(where, group["rayStartParams"], group["template"]) for where, group in groups]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, selector  # what these tests know how to evaluate
    return selector["matchLabels"].items() <= labels.items()


@cache
def monitored(kind: str) -> tuple[dict, ...]:
    """The default values with one monitor on, its own namespace and a label for Prometheus."""
    key = {"PodMonitor": "podMonitor", "ServiceMonitor": "serviceMonitor"}[kind]
    return tuple(template(
        "--set", f"metrics.{key}.enabled=true", "--set", f"metrics.{key}.namespace=monitoring",
        "--set", f"metrics.{key}.labels.release=kube-prometheus-stack", "--set", f"metrics.{key}.interval=15s",
    ))  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS)
def test_every_ray_node_exports_metrics_on_the_metrics_port(preset):
    docs = rendered(preset)
    nodes = ray_nodes(docs)
    assert len(nodes) == 1 + len(rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    for where, params, pod in nodes:
        assert params["metrics-export-port"] == "8080", where  # a string, as the CRD wants
        (ray,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in ray["ports"], where
    assert not of_kind(docs, "PodMonitor") and not of_kind(docs, "ServiceMonitor")  # off by default


def test_metrics_port_follows_values_and_can_be_turned_off():
    docs = template("-f", str(CHART / "values-gpu.yaml"), "--set", "metrics.port=9090")
    for where, params, pod in ray_nodes(docs):
        assert params["metrics-export-port"] == "9090", where
        named = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert named["metrics"] == 9090, where
    head_params = ray_nodes(docs)[0][1]
    assert head_params["num-cpus"] == "0" and head_params["dashboard-host"] == "0.0.0.0"  # the values' own params stay
    (ray_policy,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray")]
    assert [{"port": 9090, "protocol": "TCP"}] in [rule.get("ports") for rule in ray_policy["spec"]["ingress"]]

    off = template("--set", "metrics.enabled=false")
    for where, params, pod in ray_nodes(off):
        assert "metrics-export-port" not in params, where
        assert "metrics" not in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}, where
    assert "8080" not in json.dumps(of_kind(off, "NetworkPolicy"))


@pytest.mark.parametrize(
    "values, message",
    [
        (["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"], "not both"),
        (["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.enabled=false"], "set metrics.enabled"),
        (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.enabled=false"], "set metrics.enabled"),
        (["--set", "ray.workerGroups.cpu.rayStartParams.metrics-export-port=9999"], "set metrics.port only"),
    ],
)
def test_metrics_settings_that_are_refused(values, message):
    result = helm("template", "rel", str(CHART), *values, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_pod_monitor_scrapes_every_ray_pod_and_nothing_else():
    import kubernetes_validate

    docs = monitored("PodMonitor")
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and not of_kind(docs, "ServiceMonitor")
    assert not monitor_errors(monitor), monitor_errors(monitor)
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["ns"]}  # the pods stay in the release's namespace
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "10s"
    ray_pods = {where for where, _ in pod_templates([rayservice(docs)])}
    for where, pod in pod_templates(docs):
        assert selects(spec["selector"], pod["metadata"]["labels"]) == (where in ray_pods), where
    for where, _, pod in ray_nodes(docs):
        assert "metrics" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}, where
    for doc in docs:
        if not doc["apiVersion"].startswith(CRD_API_GROUPS):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_service_monitor_scrapes_every_ray_pod_through_a_headless_service():
    import kubernetes_validate

    docs = monitored("ServiceMonitor")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert not of_kind(docs, "PodMonitor")
    assert not monitor_errors(monitor), monitor_errors(monitor)
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ns"]}
    services = of_kind(docs, "Service")
    chosen = [s for s in services if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in chosen] == ["rel-unclip-metrics"]  # not the gateway's nor S3's
    (service,) = chosen
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    assert service["spec"]["clusterIP"] == "None"  # headless: one target per pod, not a balanced address
    (port,) = service["spec"]["ports"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] == "metrics" and port["targetPort"] == "metrics"
    assert endpoint["interval"] == "15s"
    ray_pods = {where for where, _ in pod_templates([rayservice(docs)])}
    for where, pod in pod_templates(docs):
        assert (service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()) == (where in ray_pods), where


def test_monitor_crd_schemas_catch_mistakes():
    """The vendored prometheus-operator schemas (made strict) refuse a misspelt field, a wrong type
    and a malformed duration."""
    pod_monitor = json.loads(json.dumps(of_kind(monitored("PodMonitor"), "PodMonitor")[0]))
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["scrapeInterval"] = endpoint.pop("interval")  # not a field
    endpoint["scrapeTimeout"] = "10 seconds"  # not a Prometheus duration
    errors = monitor_errors(pod_monitor)
    assert len(errors) == 2 and any("scrapeInterval" in e for e in errors), errors
    service_monitor = json.loads(json.dumps(of_kind(monitored("ServiceMonitor"), "ServiceMonitor")[0]))
    service_monitor["spec"]["endpoints"] = {"port": "metrics"}  # a list in the CRD
    service_monitor["spec"]["podMetricsEndpoints"] = []  # a PodMonitor's field
    assert len(monitor_errors(service_monitor)) == 2, monitor_errors(service_monitor)


@pytest.mark.parametrize("preset", PRESETS)
def test_network_policy_lets_only_the_monitoring_namespace_scrape(preset):
    docs = rendered(preset)
    (ray,) = [p["spec"] for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray")]
    release = {"app.kubernetes.io/name": "unclip", "app.kubernetes.io/instance": "rel"}
    outside = [rule for rule in ray["ingress"] if rule.get("from") != [{"podSelector": {"matchLabels": release}}]]
    scrape = [rule for rule in outside if {"port": 8080, "protocol": "TCP"} in rule.get("ports", [])]
    assert scrape == [
        {
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }
    ]
    narrowed = template("--set-json", 'metrics.scrapeFrom.podSelector={"matchLabels":{"app.kubernetes.io/name":"prometheus"}}')
    (ray,) = [p["spec"] for p in of_kind(narrowed, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray")]
    (peer,) = next(r["from"] for r in ray["ingress"] if r.get("ports") == [{"port": 8080, "protocol": "TCP"}])
    # One peer with both selectors: Prometheus' pods in the monitoring namespace (both must match).
    assert peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }


# -- values.schema.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--set", "serve.grpcPort=abc"], "/serve/grpcPort"),
        (["--set", "ray.workerGroups.cpu.replicas=-1"], "/ray/workerGroups/cpu/replicas"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "s3.internal.image.tag=latest"], "/s3/internal/image/tag"),
        (["--set", "serve.applications.prior.importPath=not a path"], "/serve/applications/prior/importPath"),
        (["--set", "gateway.service.type=Ingress"], "/gateway/service/type"),
        (["--set", "s3.bucket=Bad_Bucket"], "/s3/bucket"),
        (["--set", "tests.enabled=maybe"], "/tests/enabled"),
        (["--set", "metrics.port=0"], "/metrics/port"),
        (["--set", "metrics.podMonitor.interval=30 seconds"], "/metrics/podMonitor/interval"),
        (["--set", "metrics.serviceMonitor.scrapeInterval=30s"], "/metrics/serviceMonitor"),
        (["--set", "unknownKey=1"], "unknownKey"),
    ],
)
def test_values_schema_rejects_bad_values(bad, message):
    result = helm("template", "rel", str(CHART), *bad, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# -- helm test hook ---------------------------------------------------------------------------


def test_helm_test_pod_runs_the_smoke_script():
    docs = rendered("tiny-cpu")
    hooks = [doc for doc in docs if doc["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    (configmap,) = of_kind(hooks, "ConfigMap")
    (pod,) = of_kind(hooks, "Pod")
    smoke = (CHART / "files" / "smoke.py").read_text()
    assert configmap["data"]["smoke.py"].strip() == smoke.strip()
    compile(smoke, "smoke.py", "exec")
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "/smoke/smoke.py", "rel-unclip-gateway:9000"]
    assert "--application=gateway" in command
    assert pod["spec"]["restartPolicy"] == "Never"


def test_smoke_script_passes_against_a_gateway_and_fails_without_one(local_stages):
    """The hook's script, run for real: through the SDK against a local gateway it reports ok;
    against nothing it fails (it must not pass when generation does not work)."""
    from servers import BackgroundServer

    from gateway.api import ImageAPI
    from gateway.servicer import SERVICES, ImageServicer
    from unclip.serving import Server

    smoke = str(CHART / "files" / "smoke.py")
    with BackgroundServer(lambda: Server(ImageServicer(ImageAPI(local_stages)), SERVICES, port=0)) as server:
        ok = subprocess.run(
            [sys.executable, smoke, server.address, "--application=", "--steps=1", "--timeout=120"],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert ok.returncode == 0 and "smoke: ok: 32x32 PNG" in ok.stdout, ok.stdout + ok.stderr
    dead = subprocess.run([sys.executable, smoke, "127.0.0.1:1", "--timeout=3"], capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and "smoke:" in dead.stderr


# -- Dockerfiles (no Docker engine here: what can be checked by reading) -----------------------


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_sanity(name):
    text = (DOCKER / name).read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip() and not line.startswith("#")]
    froms = [line for line in instructions if line.upper().startswith("FROM ")]
    assert len(froms) >= 2 and any(" AS builder" in line for line in froms), "multi-stage with a builder"
    assert any(line.startswith("COPY --from=builder /opt/unclip /opt/unclip") for line in instructions)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for line in froms:
        image = line.split()[1]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in ("builder",):
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned base {image}"
    users = [line for line in instructions if line.upper().startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert re.search(r"\[\$\{EXTRAS\}\]", text) and "ARG EXTRAS=server" in text
    assert "ray[serve]==${RAY_VERSION}" in text and "ARG RAY_VERSION=2.60.0" in text
    assert "wget" in text  # KubeRay's probes
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf'"{pkg}==([^"]+)"', pyproject).group(1)
        assert args[arg] == pinned, f"{name}: {arg} {args[arg]} != pyproject's {pinned}"
    ignore = (DOCKER / f"{name}.dockerignore").read_text()
    assert "**" in ignore.splitlines() and "!unclip/" in ignore.splitlines()  # deny by default, then the sources


def test_image_tags_match_chart():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    import unclip

    assert chart["appVersion"] == unclip.__version__
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", (DOCKER / "Dockerfile.cpu").read_text()).group(1)
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"] == ray_version


# -- the rendered serveConfigV2 on a local Ray cluster ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rendered_serve_config_deploys_on_local_ray():
    """Deploy the tiny-cpu preset's serveConfigV2 on a local Ray cluster (unclip.ray_apps.deploy)
    and generate one image through Serve's gRPC proxy with `application: gateway` metadata."""
    import shutil
    import socket
    import tempfile

    import grpc
    import ray
    from ray import serve

    from unclip import ray_apps
    from unclip.v1 import images_pb2, images_pb2_grpc

    config = serve_config(rendered("tiny-cpu"))
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    config["http_options"] = {"host": "127.0.0.1", "port": ports[0]}
    config["grpc_options"]["port"] = ports[1]
    config["proxy_location"] = "HeadOnly"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        ray_apps.deploy(config, timeout_s=600)
        params = images_pb2.GenerationParameters(
            prompt="a red circle", n=1, size=32, seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=2
        )
        with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            response = images_pb2_grpc.ImageServiceStub(channel).Generate(
                images_pb2.GenerateRequest(parameters=params), metadata=(("application", "gateway"),), timeout=300
            )
        assert len(response.images) == 1 and response.images[0].png.startswith(b"\x89PNG")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- draining a stopping Ray pod ---------------------------------------------------------------


def _ray_pods(docs) -> list[tuple[str, dict]]:
    return [(where, pod) for where, pod in pod_templates(docs) if where.startswith("RayService/")]


@pytest.mark.parametrize("preset", PRESETS)
def test_ray_pods_outlast_the_serve_drain(preset):
    """Kubernetes must not kill a Ray pod before its preStop sleep and Serve's drain are over,
    and `ray stop` must give the replicas the drain the Serve config promises them."""
    docs = rendered(preset)
    drains = [d.get("graceful_shutdown_timeout_s", 20) for app in serve_config(docs)["applications"] for d in app["deployments"]]
    for where, pod in _ray_pods(docs):
        (container,) = pod["spec"]["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"][-1]
        sleep = int(command.split("sleep ")[1].split(";")[0])
        assert f"ray stop --grace-period {max(drains)}" in command, where
        assert pod["spec"]["terminationGracePeriodSeconds"] > sleep + max(drains), where


def test_a_longer_drain_lengthens_the_pods_grace():
    docs = template("--set", "serve.applications.decoder.deployments[0].name=Decoder",
                    "--set", "serve.applications.decoder.deployments[0].graceful_shutdown_timeout_s=120")  # fmt: skip
    for where, pod in _ray_pods(docs):
        assert pod["spec"]["terminationGracePeriodSeconds"] == 5 + 120 + 15, where


# -- TLS on the gateway's public endpoints ---------------------------------------------------

TLS_VALUES = (
    "--set", "gateway.tls.enabled=true", "--set", "gateway.tls.certificate.create=true",
    "--set", "gateway.tls.certificate.issuerRef.name=letsencrypt", "--set", "gateway.tls.certificate.dnsNames[0]=images.example.com",
    "--set", "gateway.tls.certificate.renewBefore=360h",
)  # fmt: skip


def _ray_container(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def test_gateway_https_from_a_secret_cert_manager_issues():
    """Serve's HTTP proxy serves HTTPS with the Secret's tls.crt/tls.key, mounted on every Ray
    node (a proxy runs on each); cert-manager's Certificate writes that Secret; workers get a
    readiness probe that checks the proxy over HTTPS, since KubeRay's checks it over HTTP."""
    from ray.serve.schema import ServeDeploySchema

    docs = template(*TLS_VALUES)
    http = serve_config(docs)["http_options"]
    assert http == {"host": "0.0.0.0", "port": 8000, "ssl_certfile": "/etc/unclip/gateway-tls/tls.crt",
                    "ssl_keyfile": "/etc/unclip/gateway-tls/tls.key"}  # fmt: skip
    assert ServeDeploySchema.model_validate(serve_config(docs)).http_options.ssl_certfile == http["ssl_certfile"]
    for where, pod in _ray_pods(docs):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["gateway-tls"]["secret"]["secretName"] == "rel-unclip-gateway-tls", where
        assert volumes["gateway-tls"]["secret"]["defaultMode"] == 0o440, where  # the key: not world-readable
        container = _ray_container(pod)
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["gateway-tls"] == {"name": "gateway-tls", "mountPath": "/etc/unclip/gateway-tls", "readOnly": True}
        if where.endswith("/head"):
            assert "readinessProbe" not in container  # KubeRay's own, and the operator checks the head's proxy itself
        else:
            probe = " ".join(container["readinessProbe"]["exec"]["command"])
            assert "https://localhost:8000/-/healthz" in probe and "local_raylet_healthz" in probe, where
    (certificate,) = of_kind(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == "rel-unclip-gateway-tls"
    assert certificate["spec"]["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert certificate["spec"]["dnsNames"] == ["images.example.com"] and certificate["spec"]["renewBefore"] == "360h"
    assert "server auth" in certificate["spec"]["usages"]
    (service,) = [doc for doc in of_kind(docs, "Service") if doc["metadata"]["name"] == "rel-unclip-gateway"]
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert ports["http"]["appProtocol"] == "https"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"  # Ray's gRPC proxy has no TLS

    import kubernetes_validate

    for doc in docs:
        if not doc["apiVersion"].startswith((*CRD_API_GROUPS, "cert-manager.io/")):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    errors = list(jsonschema.Draft7Validator(crd_schema()).iter_errors(rayservice(docs)))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10]]


def test_an_existing_tls_secret_and_the_default_without_tls():
    docs = template("--set", "gateway.tls.enabled=true", "--set", "gateway.tls.secretName=my-cert")
    assert not of_kind(docs, "Certificate")  # the Secret is yours (or another Certificate's)
    for where, pod in _ray_pods(docs):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["gateway-tls"]["secret"]["secretName"] == "my-cert", where
    plain = rendered("default")
    assert "ssl_certfile" not in serve_config(plain)["http_options"]
    assert not of_kind(plain, "Certificate")
    for where, pod in _ray_pods(plain):
        assert "gateway-tls" not in {v["name"] for v in pod["spec"]["volumes"]}, where
        assert "readinessProbe" not in _ray_container(pod), where  # KubeRay injects its own


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "gateway.tls.enabled=true", "--set", "ray.workerGroups.cpu.enabled=false"], "worker group"),
        (["--set", "gateway.tls.enabled=true", "--set", "gateway.tls.certificate.create=true"], "issuerRef.name"),
        ([*TLS_VALUES[:4], "--set", "gateway.tls.certificate.issuerRef.name=ca"], "dnsNames"),
        (["--set", "gateway.tls.enabled=yes"], "/gateway/tls/enabled"),
        (["--set", "gateway.tls.mountPath=relative"], "/gateway/tls/mountPath"),
    ],
)
def test_tls_settings_that_are_refused(values, message):
    result = helm("template", "rel", str(CHART), *values, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# -- API keys ------------------------------------------------------------------------------------


def test_api_keys_from_an_existing_secret():
    """auth.existingSecret: the Secret is mounted as a directory on every Ray pod (no subPath, so
    kubelet's updates reach the file and keys rotate without a restart), and the gateway app
    reads its keys file there, with the quota defaults; the smoke test sends a key."""
    from ray.serve.schema import ServeDeploySchema

    docs = template(
        "--set", "auth.existingSecret=unclip-keys", "--set", "auth.imagesPerMinute=30", "--set", "auth.maxConcurrentPerKey=2",
        "--set", "tests.apiKeySecret.name=unclip-smoke-key",
    )  # fmt: skip
    config = serve_config(docs)
    (gateway,) = [app for app in config["applications"] if app["name"] == "gateway"]
    assert gateway["args"]["api_keys_file"] == "/etc/unclip/auth/keys.json"
    assert (gateway["args"]["images_per_minute"], gateway["args"]["max_concurrent_per_key"]) == (30, 2)
    for app in config["applications"]:
        assert app["name"] == "gateway" or "api_keys_file" not in app.get("args", {})
    ServeDeploySchema.model_validate(config)
    for where, pod in _ray_pods(docs):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["api-keys"]["secret"] == {"secretName": "unclip-keys", "defaultMode": 0o440}, where
        mounts = {m["name"]: m for m in _ray_container(pod)["volumeMounts"]}
        assert mounts["api-keys"] == {"name": "api-keys", "mountPath": "/etc/unclip/auth", "readOnly": True}, where
    (smoke,) = [doc for doc in of_kind(docs, "Pod") if doc["metadata"]["name"].endswith("-smoke")]
    (env,) = smoke["spec"]["containers"][0]["env"]
    assert env == {"name": "UNCLIP_API_KEY", "valueFrom": {"secretKeyRef": {"name": "unclip-smoke-key", "key": "api-key"}}}
    with_keys = notes("--set", "auth.existingSecret=unclip-keys")
    assert "WARNING: no API keys" not in with_keys and "Secret unclip-keys" in with_keys
    assert "tests.apiKeySecret" in with_keys  # helm test needs a key too

    import kubernetes_validate

    for doc in docs:
        if not doc["apiVersion"].startswith(CRD_API_GROUPS):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    errors = list(jsonschema.Draft7Validator(crd_schema()).iter_errors(rayservice(docs)))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10]]


def test_no_api_keys_by_default():
    docs = rendered("default")
    (gateway,) = [app for app in serve_config(docs)["applications"] if app["name"] == "gateway"]
    assert "api_keys_file" not in gateway["args"]
    for where, pod in _ray_pods(docs):
        assert "api-keys" not in {v["name"] for v in pod["spec"]["volumes"]}, where
    (smoke,) = [doc for doc in of_kind(docs, "Pod") if doc["metadata"]["name"].endswith("-smoke")]
    assert "env" not in smoke["spec"]["containers"][0]
    assert "WARNING: no API keys" in notes()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "auth.imagesPerMinute=5"], "set auth.existingSecret"),
        (["--set", "auth.existingSecret=k", "--set", "auth.maxConcurrentPerKey=0"], "/auth/maxConcurrentPerKey"),
        (["--set", "auth.mountPath=relative"], "/auth/mountPath"),
    ],
)
def test_auth_settings_that_are_refused(values, message):
    result = helm("template", "rel", str(CHART), *values, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
