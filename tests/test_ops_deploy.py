"""deploy/ and docs/deployment.md, checked as far as this machine allows (no docker, no cluster): every
manifest, compose and provisioning file parses; every `qvl` flag they and the guide name exists in
`qvl serve --help` (or `qvl batch --help`); ports and probe / scrape paths match the server's routes and
--port; the graceful-termination budget covers --graceful-shutdown-timeout; every metric the dashboard,
the HPA and the prometheus-adapter rule read is one the server exports."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
GUIDE = ROOT / "docs" / "deployment.md"


def _help(cmd: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "qvl.cli", cmd, "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
                         check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


@pytest.fixture(scope="module")
def serve_flags() -> set[str]:
    return _help("serve")


def _yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _docker_cmd(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    return json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))


def _flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _manifests() -> dict[str, dict]:
    docs = {}
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in _yaml(f):
            docs[d.get("kind", f.name)] = d
    return docs


def test_every_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 9
    for f in files:
        assert _yaml(f), f
    json.loads((DEPLOY / "grafana" / "dashboards" / "qvl.json").read_text())
    kust = _yaml(DEPLOY / "k8s" / "kustomization.yaml")[0]
    for res in kust["resources"]:
        assert (DEPLOY / "k8s" / res).is_file(), res
    kinds = {d["kind"] for f in kust["resources"] for d in _yaml(DEPLOY / "k8s" / f)}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def _commands() -> dict[str, list[str]]:
    """Every qvl serve argument list in deploy/ (compose, k8s, both Dockerfiles)."""
    compose = _yaml(DEPLOY / "compose.yaml")[0]
    dep = _manifests()["Deployment"]
    return {"compose": compose["services"]["qvl"]["command"],
            "k8s": dep["spec"]["template"]["spec"]["containers"][0]["args"],
            "Dockerfile": _docker_cmd(DEPLOY / "Dockerfile"),
            "Dockerfile.cuda": _docker_cmd(DEPLOY / "Dockerfile.cuda")}


def _guide_commands(name: str) -> list[list[str]]:
    text = GUIDE.read_text().replace("\\\n", " ")
    return [ln.split() for ln in text.splitlines() if ln.strip().startswith(f"qvl {name} ")]


def test_flags_exist(serve_flags):
    for where, args in _commands().items():
        for a in args:
            if a.startswith("--"):
                assert a in serve_flags, f"{where}: {a} is not a `qvl serve` flag"
    guide = _guide_commands("serve")
    assert len(guide) >= 3, "the guide has a qvl serve command per pattern"
    for cmd in guide:
        for a in cmd:
            if a.startswith("--"):
                assert a.split("=")[0] in serve_flags, f"docs/deployment.md: {a} is not a `qvl serve` flag"
    batch_flags = _help("batch")
    for cmd in _guide_commands("batch"):
        for a in cmd:
            if a.startswith("--") or a == "-o":
                assert a.split("=")[0] in batch_flags | {"-o"}, f"docs/deployment.md: {a} is not a `qvl batch` flag"


def test_ports_and_paths_match_the_server():
    from qvl.server.routes import router

    paths = {r.path for r in router.routes}
    assert {"/health", "/metrics"} <= paths
    cmds = _commands()
    for where, args in cmds.items():
        assert _flag_value(args, "--port") == "8000", where
        assert _flag_value(args, "--host") == "0.0.0.0", where       # reachable from outside the container
    compose = _yaml(DEPLOY / "compose.yaml")[0]["services"]
    assert compose["qvl"]["ports"] == ["8000:8000"]
    assert "qvl:8000" in _yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]["static_configs"][0]["targets"]
    assert _yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]["metrics_path"] in paths
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        assert "EXPOSE 8000" in text and "http://127.0.0.1:8000/health" in text and "USER qvl" in text
        assert 'VOLUME ["/models"]' in text and _docker_cmd(DEPLOY / name)[0].startswith("/models/")
    assert "torch==${TORCH_VERSION}" in (DEPLOY / "Dockerfile").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in (DEPLOY / "Dockerfile").read_text()

    m = _manifests()
    pod = m["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    port = c["ports"][0]
    assert port["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths and c[probe]["httpGet"]["port"] == port["name"]
    assert m["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert m["Service"]["spec"]["selector"] == m["Deployment"]["spec"]["selector"]["matchLabels"]
    assert m["PodDisruptionBudget"]["spec"]["selector"] == m["Deployment"]["spec"]["selector"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ann = m["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == "8000" and ann["prometheus.io/path"] in paths
    grace = float(_flag_value(c["args"], "--graceful-shutdown-timeout"))
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    compose_grace = float(_flag_value(cmds["compose"], "--graceful-shutdown-timeout"))
    assert float(compose["qvl"]["stop_grace_period"].rstrip("s")) > compose_grace


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Metric names the server exports with --metrics-compat vllm --cost-per-hour (after one request)."""
    from qvl.server.metrics import ServerMetrics

    stats = {"num_running": 1, "num_waiting": 2, "kv_blocks_total": 10, "kv_blocks_free": 5, "kv_cache_usage": 0.5,
             "prefix_cache_queries": 4, "prefix_cache_hits": 1, "encoder_cache_queries": 1, "encoder_cache_hits": 0,
             "num_preemptions": 0, "busy_time_s": 1.0}
    m = ServerMetrics("m", lambda: stats, 1024, compat="vllm", cost_per_hour=1.0)
    m.observe_finished(finish_reasons=["stop"], prompt_tokens=3, completion_tokens=2, ttft=0.1, e2e=0.2,
                       itls=[0.05], queue_time=0.01)
    m.observe_failure(400)
    m.request_cost(0.5)
    text = m.render()[0].decode()
    return {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")}


def test_dashboard_and_autoscaling_read_exported_metrics(exported):
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "qvl.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dash["panels"])
    for word in ("Time to first token", "P95 / P99", "Tokens per hour", "KV-cache", "Cost"):
        assert word in titles
    used = {n for e in exprs for n in re.findall(r"(?:qvl|vllm):[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported

    hpa = _manifests()["HorizontalPodAutoscaler"]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rule = _yaml(DEPLOY / "k8s" / "prometheus-adapter-values.yaml")[0]["rules"]["custom"][0]
    series = re.search(r'__name__=~"\^(.*)\$"', rule["seriesQuery"]).group(1)
    names = [n for n in exported if re.fullmatch(series, n)]
    assert "qvl:num_requests_waiting" in names
    renamed = {re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), n) for n in names}
    assert name in renamed and ":" not in name
    assert hpa["spec"]["scaleTargetRef"]["name"] == _manifests()["Deployment"]["metadata"]["name"]
