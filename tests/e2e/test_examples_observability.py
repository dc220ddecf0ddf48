"""The observability examples stay in step with the metrics the filter defines.

examples/prometheus.yml, examples/prometheus-rules.yml and the Grafana dashboard in
examples/grafana/ are checked against src/metrics.rs: every `ma_gateway_*` series named in a
PromQL expression exists with that kind (histograms only as `_bucket`/`_sum`/`_count`), and every
label in a `{...}` matcher, a `by (...)`/`without (...)` clause or an `on`/`ignoring`/`group_*`
clause is one that metric has (or `le` on buckets, or a label Prometheus adds at scrape time).

Needs no running Envoy: it uses none of conftest.py's process fixtures. Only stdlib + PyYAML.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
METRICS_RS = ROOT / "src" / "metrics.rs"
ENVOY_YAML = ROOT / "envoy.yaml"
EXAMPLES = ROOT / "examples"
PROMETHEUS_YML = EXAMPLES / "prometheus.yml"
RULES_YML = EXAMPLES / "prometheus-rules.yml"
# Not examples/*.json: tests/examples.rs compiles every examples/*.json as a plugin config.
DASHBOARD_JSON = EXAMPLES / "grafana" / "ma-gateway-dashboard.json"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus attaches to every scraped series (plus any static_configs labels, added below).
SCRAPE_LABELS = {"instance", "job"}


# ----------------------------------------------------------------------------- src/metrics.rs

@dataclass(frozen=True)
class Metric:
    ident: str
    name: str
    kind: str
    labels: tuple[str, ...]


METRIC_CALL = re.compile(
    r'metric!\(\s*([A-Z][A-Z0-9_]*)\s*,\s*"([a-z0-9_]+)"\s*,\s*(Counter|Gauge|Histogram)\s*,'
    r'\s*\[([^\]]*)\]',
    re.S,
)


def load_metrics() -> dict[str, Metric]:
    source = METRICS_RS.read_text()
    metrics = {}
    for ident, name, kind, labels in METRIC_CALL.findall(source):
        metrics[name] = Metric(ident, name, kind, tuple(re.findall(r'"(\w+)"', labels)))
    # The regex must not silently miss a definition: compare with the `ALL` list.
    all_block = re.search(r"pub const ALL: &\[Metric\] = &\[(.*?)\];", source, re.S)
    assert all_block, "src/metrics.rs: `pub const ALL` not found"
    listed = set(re.findall(r"[A-Z][A-Z0-9_]*", all_block.group(1)))
    assert listed == {m.ident for m in metrics.values()}, (
        "metric!(...) definitions parsed from src/metrics.rs differ from ALL: "
        f"{sorted(listed ^ {m.ident for m in metrics.values()})}")
    return metrics


def series_labels(metrics: dict[str, Metric], series: str) -> set[str] | None:
    """The labels a `ma_gateway_*` series may carry, or None if no such series exists."""
    metric = metrics.get(series)
    if metric is not None:
        return set(metric.labels) if metric.kind in ("Counter", "Gauge") else None
    for suffix in HISTOGRAM_SUFFIXES:
        base = metrics.get(series.removesuffix(suffix)) if series.endswith(suffix) else None
        if base is not None and base.kind == "Histogram":
            return set(base.labels) | ({"le"} if suffix == "_bucket" else set())
    return None


# ----------------------------------------------------------------------------- PromQL scanning

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "atan2", "inf", "nan"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
CLAUSE = re.compile(r"(?<![\w:])(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
MATCHERS = re.compile(r"\{[^{}]*\}")
RANGE = re.compile(r"\[[^\[\]]*\]")
IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)")
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*(?:"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')')


@dataclass
class Selector:
    name: str
    start: int
    matcher_labels: list[str] = field(default_factory=list)


@dataclass
class Clause:
    keyword: str
    labels: list[str]
    argument: tuple[int, int] | None  # span of the aggregated expression (by/without only)


@dataclass
class Parsed:
    selectors: list[Selector]
    clauses: list[Clause]


def _blank(text: str, start: int, end: int, keep_ends: bool = False) -> str:
    inner = (start + 1, end - 1) if keep_ends else (start, end)
    return text[:inner[0]] + " " * (inner[1] - inner[0]) + text[inner[1]:]


def _matching(text: str, index: int) -> int:
    """Index of the bracket matching the one at `index` (forwards for '(', backwards for ')')."""
    step, open_, close = (1, "(", ")") if text[index] == "(" else (-1, ")", "(")
    depth = 0
    i = index
    while 0 <= i < len(text):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError(f"unbalanced parentheses in {text!r}")


def parse_promql(expr: str) -> Parsed:
    """Metric selectors (with their matcher labels) and label clauses of a PromQL expression.

    A scanner, not a full parser: enough for the expressions in these examples, and strict
    (anything it cannot place is an error) so an unexpected shape fails loudly.
    """
    text = expr
    for m in STRING.finditer(expr):  # string contents can hold anything: blank them first
        text = _blank(text, m.start(), m.end(), keep_ends=True)
    clauses = []
    for m in CLAUSE.finditer(text):
        labels = [label.strip() for label in m.group(2).split(",") if label.strip()]
        argument = None
        if m.group(1) in ("by", "without"):
            after = m.end()
            while after < len(text) and text[after].isspace():
                after += 1
            if after < len(text) and text[after] == "(":  # sum by (l) (ARG)
                argument = (after, _matching(text, after))
            else:  # sum (ARG) by (l)
                before = m.start() - 1
                while before >= 0 and text[before].isspace():
                    before -= 1
                if before < 0 or text[before] != ")":
                    raise ValueError(f"cannot find what `{m.group(0)}` aggregates in {expr!r}")
                argument = (_matching(text, before), before)
        clauses.append(Clause(m.group(1), labels, argument))
    for m in CLAUSE.finditer(text):
        text = _blank(text, m.start(), m.end())
    matcher_blocks = {}
    for m in MATCHERS.finditer(text):
        head = re.search(r"([A-Za-z_:][\w:]*)\s*$", text[:m.start()])
        if not head or head.group(1) in KEYWORDS:
            raise ValueError(f"matcher {expr[m.start():m.end()]!r} without a metric name in {expr!r}")
        block = expr[m.start() + 1:m.end() - 1]
        labels = MATCHER.findall(block)
        leftover = MATCHER.sub("", block).replace(",", "").strip()
        if leftover:
            raise ValueError(f"cannot read matchers {block!r} in {expr!r}")
        matcher_blocks[head.start(1)] = labels
    for m in list(MATCHERS.finditer(text)) + list(RANGE.finditer(text)):
        text = _blank(text, m.start(), m.end())
    selectors = []
    for m in IDENT.finditer(text):
        name = m.group(1)
        following = text[m.end():].lstrip()
        if name in KEYWORDS or following.startswith("("):
            continue  # a keyword, or a function / aggregation being called
        selectors.append(Selector(name, m.start(), matcher_blocks.pop(m.start(), [])))
    if matcher_blocks:
        raise ValueError(f"matchers not attached to a metric in {expr!r}")
    return Parsed(selectors, clauses)


# ----------------------------------------------------------------------------- the examples

def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def rule_groups() -> list[dict]:
    return load_yaml(RULES_YML)["groups"]


def recorded_names() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def scrape_labels() -> set[str]:
    labels = set(SCRAPE_LABELS)
    for job in load_yaml(PROMETHEUS_YML).get("scrape_configs", []):
        for static in job.get("static_configs", []):
            labels |= set(static.get("labels", {}))
    return labels


def dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def all_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variable_query(variable: dict) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every expression in the rules and the dashboard."""
    found = []
    for group in rule_groups():
        for rule in group["rules"]:
            found.append((f"{RULES_YML.name}: {rule.get('record') or rule.get('alert')}", rule["expr"]))
    board = dashboard()
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            found.append((f"dashboard panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in board["templating"]["list"]:
        query = variable_query(variable)
        label_values = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
        if label_values:
            # label_values(selector, label) is Grafana's, not PromQL: check it as `sum by (label) (selector)`.
            query = f"sum by ({label_values.group(2)}) ({label_values.group(1)})"
        found.append((f"dashboard variable {variable['name']}", query))
    return found


def problems_in(expr: str, metrics: dict[str, Metric], recorded: set[str], extra_labels: set[str]) -> list[str]:
    """Everything wrong with the metric names and labels one expression uses."""
    parsed = parse_promql(expr)
    problems = []
    allowed: dict[int, set[str]] = {}  # selector start -> labels it may carry
    for sel in parsed.selectors:
        if sel.name.startswith("ma_gateway_"):
            labels = series_labels(metrics, sel.name)
            if labels is None:
                problems.append(f"{sel.name} is not a series of any metric in src/metrics.rs "
                                "(histograms only as _bucket/_sum/_count, counters and gauges bare)")
                continue
            allowed[sel.start] = labels | extra_labels
            for label in sel.matcher_labels:
                if label not in allowed[sel.start]:
                    problems.append(f"{sel.name} has no label {label!r} (matcher)")
        elif ":" in sel.name:
            if sel.name not in recorded:
                problems.append(f"{sel.name} is not recorded by {RULES_YML.name}")
        elif not sel.name.startswith("envoy_"):
            problems.append(f"{sel.name}: neither a ma_gateway_ metric, an Envoy stat nor a recorded series")
    everything = set().union(*allowed.values()) if allowed else set()
    for clause in parsed.clauses:
        if clause.argument is None:  # on / ignoring / group_left / group_right
            for label in clause.labels:
                if allowed and label not in everything:
                    problems.append(f"`{clause.keyword}` label {label!r} is on none of the metrics used")
            continue
        lo, hi = clause.argument
        inside = [sel for sel in parsed.selectors if lo < sel.start < hi and sel.start in allowed]
        for sel in inside:
            for label in clause.labels:
                if label not in allowed[sel.start]:
                    problems.append(f"{sel.name} has no label {label!r} (`{clause.keyword}`)")
            if (clause.keyword == "by" and "histogram_quantile" in expr
                    and sel.name.endswith("_bucket") and "le" not in clause.labels):
                problems.append(f"{sel.name} aggregated without `le` under histogram_quantile")
    return problems


# ----------------------------------------------------------------------------- tests

def test_files_parse_and_the_scrape_job_reads_envoy_admin_prometheus_stats():
    config = load_yaml(PROMETHEUS_YML)
    jobs = config["scrape_configs"]
    assert jobs and all(job["metrics_path"] == "/stats/prometheus" for job in jobs)
    admin = load_yaml(ENVOY_YAML)["admin"]["address"]["socket_address"]
    targets = [t for job in jobs for s in job.get("static_configs", []) for t in s["targets"]]
    assert f"{admin['address']}:{admin['port_value']}" in targets, "the job should scrape the shipped admin address"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_YML.parent / rule_file).resolve() == RULES_YML.resolve()
    assert rule_groups() and dashboard()["panels"]


def test_every_metric_is_parsed_from_src_metrics_rs():
    metrics = load_metrics()
    assert len(metrics) >= 10
    assert metrics["ma_gateway_tokens_total"].labels == ("tenant", "model", "type")
    assert metrics["ma_gateway_operation_duration_milliseconds"].kind == "Histogram"


@pytest.mark.parametrize("where,expr", expressions())
def test_expression_uses_only_defined_metrics_and_labels(where, expr):
    problems = problems_in(expr, load_metrics(), recorded_names(), scrape_labels())
    assert not problems, f"{where}: {expr}\n  " + "\n  ".join(problems)


def test_every_expression_selects_something():
    for where, expr in expressions():
        assert parse_promql(expr).selectors, f"{where}: no metric found in {expr!r}"


@pytest.mark.parametrize("expr,wrong", [
    ("sum by (model) (rate(ma_gateway_upstream_list_cost_cents_total[5m]))", "no label 'model'"),
    ('rate(ma_gateway_requests_total{tenant="a"}[5m])', "no label 'tenant'"),
    ("histogram_quantile(0.9, sum by (le) (rate(ma_gateway_stream_duration_milliseconds[5m])))", "not a series"),
    ("rate(ma_gateway_tokens_total_bucket[5m])", "not a series"),
    ("sum(rate(ma_gateway_stream_duration_milliseconds_sum{le=\"1\"}[5m]))", "no label 'le'"),
    ("histogram_quantile(0.9, sum by (family) (rate(ma_gateway_operation_duration_milliseconds_bucket[5m])))",
     "without `le`"),
    ("sum(rate(ma_gateway_tokens_total[5m])) by (reason)", "no label 'reason'"),
    ("rate(ma_gatway_tokens_total[5m])", "neither"),
    ("tenant:ma_gateway_nothing:rate5m", "not recorded"),
    ("a_total / on (tenant) ma_gateway_refusals_total", "`on` label 'tenant'"),
])
def test_the_checker_catches_mistakes(expr, wrong):
    problems = problems_in(expr, load_metrics(), recorded_names(), SCRAPE_LABELS)
    assert any(wrong in p for p in problems), problems


def test_the_checker_accepts_good_shapes():
    good = [
        'sum by (tenant) (increase(ma_gateway_cost_microdollars_total{tenant=~"$tenant",model=~"$model"}[$__range])) / 1e6',
        "histogram_quantile(0.95, sum by (le, family) (rate(ma_gateway_operation_duration_milliseconds_bucket[5m])))",
        "sum(rate(ma_gateway_refusals_total[5m])) by (reason) / ignoring (reason) group_left sum(rate(ma_gateway_requests_total[5m]))",
        "x unless x offset 30m".replace("x", "ma_gateway_unpriced_tokens_total"),
        "sum by (instance) (ma_gateway_active_streams)",
    ]
    for expr in good:
        assert problems_in(expr, load_metrics(), recorded_names(), SCRAPE_LABELS) == [], expr


def test_every_metric_appears_on_the_dashboard():
    used = {sel.name for _, expr in expressions() for sel in parse_promql(expr).selectors}
    missing = [m.name for m in load_metrics().values()
               if not ({m.name} | {m.name + s for s in HISTOGRAM_SUFFIXES}) & used]
    assert not missing, f"metrics in src/metrics.rs with no panel or rule: {missing}"


def test_envoy_stat_labels_name_what_envoy_yaml_defines():
    envoy = load_yaml(ENVOY_YAML)
    clusters = {c["name"] for c in envoy["static_resources"]["clusters"]}
    prefixes = {f["typed_config"]["stat_prefix"]
                for listener in envoy["static_resources"]["listeners"]
                for chain in listener["filter_chains"] for f in chain["filters"]
                if "stat_prefix" in f.get("typed_config", {})}
    for where, expr in expressions():
        for value in re.findall(r'envoy_cluster_name\s*=\s*"([^"]*)"', expr):
            assert value in clusters, f"{where}: no cluster {value!r} in envoy.yaml"
        for value in re.findall(r'envoy_http_conn_manager_prefix\s*=\s*"([^"]*)"', expr):
            assert value in prefixes, f"{where}: no HCM stat_prefix {value!r} in envoy.yaml"


def test_dashboard_structure():
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in all_panels(board["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"tenant", "model"} <= set(variables)
    for name in ("tenant", "model"):
        assert variable_query(variables[name]).startswith("label_values(")
    for panel in all_panels(board["panels"]):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_rules_are_well_formed():
    names = []
    for group in rule_groups():
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            if "record" in rule:
                assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
                names.append(rule["record"])
            else:
                assert rule["labels"]["severity"] and rule["annotations"]["summary"], rule["alert"]
                names.append(rule["alert"])
    assert len(names) == len(set(names))
    assert sum(1 for g in rule_groups() for r in g["rules"] if "alert" in r) >= 2


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_config_and_rules():
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(RULES_YML)]):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
