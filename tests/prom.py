"""deploy/monitoring as test data, and the real Prometheus tools that check it.

One place reads the dashboard's and the PrometheusRule's expressions (`dashboard_exprs`,
`rule_exprs`) and turns Grafana's variables into concrete values (`substitute`), so the unit
tier (promtool) and the integration tier (a live Prometheus) check the same strings. A small
PromQL lexer finds the metric selectors of an expression (`selectors`) — enough to catch a
misspelt name or label, not a parser: promtool and Prometheus do the parsing. `Prometheus`
runs the real server on 127.0.0.1 with its data in a directory of the test's own.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

from tests.conftest import read_text

MONITORING = os.path.join(os.path.dirname(__file__), "..", "deploy", "monitoring")
DASHBOARD = os.path.join(MONITORING, "strata-dashboard.json")
RULE = os.path.join(MONITORING, "prometheus-rule.yaml")

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
MISSING = "needs Debian's prometheus package (scripts/system-deps.sh installs it)"

# What Grafana puts in place of its variables; `node` is the regex of "All".
GRAFANA = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "node": ".+",
           "datasource": "prometheus"}


def substitute(expr: str, **values: str) -> str:
    """`expr` with Grafana's `$x`, `${x}`, `${x:fmt}` and `[[x]]` replaced by `values` (over
    GRAFANA's defaults); a variable without a value is an error, never left in."""
    known = {**GRAFANA, **values}

    def value(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name not in known:
            raise KeyError(f"no value for Grafana variable {name!r} in {expr!r}")
        return known[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


# -- the deploy files ----------------------------------------------------------------------
def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included; rows themselves are not panels."""
    out = []
    for p in board.get("panels", []):
        if p.get("type") == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """[(id "panel title/refId", raw expr)] for every target of every panel."""
    return [(f"{p['title']}/{t.get('refId', '?')}", t.get("expr", ""))
            for p in panels(dashboard()) for t in p.get("targets", [])]


def prometheus_rule() -> dict:
    with open(RULE) as f:
        return yaml.safe_load(f)


def rules() -> list[dict]:
    return [r for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]]


def rule_exprs() -> list[tuple[str, str]]:
    """[(alert or record name, expr)] of the PrometheusRule."""
    return [(r.get("alert") or r["record"], r["expr"].strip()) for r in rules()]


def write_rules_file(path) -> str:
    """The PrometheusRule's `spec` is a plain Prometheus rules file."""
    with open(path, "w") as f:
        yaml.safe_dump(prometheus_rule()["spec"], f, sort_keys=False)
    return str(path)


def write_recording_rules(path, exprs: list[str]) -> str:
    """Throwaway recording rules around `exprs`, so `promtool check rules` parses them."""
    group = {"name": "parse-only",
             "rules": [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}
    with open(path, "w") as f:
        yaml.safe_dump({"groups": [group]}, f, sort_keys=False)
    return str(path)


# -- a PromQL lexer, enough to find selectors ----------------------------------------------
TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<num>(?:\d+(?:ms|[smhdwy]))+(?![\w.])|0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>@(){}\[\],])
""", re.VERBOSE)

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "start", "end"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
COMPARISONS = {">", "<", ">=", "<=", "==", "!="}


@dataclasses.dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int


def tokens(expr: str) -> list[Token]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot lex {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "ws":
            out.append(Token(m.lastgroup, m.group(), pos))
        pos = m.end()
    return out


@dataclasses.dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)

    def __str__(self) -> str:
        inner = ", ".join(f"{k}{op}{json.dumps(v)}" for k, op, v in self.matchers)
        return f"{self.name}{{{inner}}}" if inner else self.name


def _skip_group(toks: list[Token], i: int) -> int:
    """Index after the bracketed group opening at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].text in "({[":
            depth += 1
        elif toks[j].text in ")}]":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced brackets")


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of `expr`: metric name and label matchers."""
    toks, out, i = tokens(expr), [], 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1].text if i + 1 < len(toks) else ""
        if t.kind == "ident" and t.text in LABEL_LISTS:
            i = _skip_group(toks, i + 1) if nxt == "(" else i + 1
        elif t.kind == "ident" and (nxt == "(" or t.text in KEYWORDS or t.text in AGGREGATIONS):
            i += 1  # a function, an aggregation or a keyword
        elif t.kind == "ident" or t.text == "{":
            name = t.text if t.kind == "ident" else ""
            j = i + 1 if t.kind == "ident" else i
            matchers = []
            if j < len(toks) and toks[j].text == "{":
                end = _skip_group(toks, j)
                inner = toks[j + 1:end - 1]
                for k in range(0, len(inner), 4):  # label op "value" [,]
                    label, op, value = inner[k:k + 3]
                    matchers.append((label.text, op.text, _unquote(value.text)))
                j = end
            out.append(Selector(name, tuple(matchers)))
            i = j
        elif t.text == "[":
            i = _skip_group(toks, i)  # a range or subquery duration
        else:
            i += 1
    return out


AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile"}


def _unquote(s: str) -> str:
    return s[1:-1] if s[0] == "`" else json.loads(s) if s[0] == '"' else s[1:-1]


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr)}


def without_comparison(expr: str) -> str | None:
    """The left side of `expr` if its outermost operation compares with a number
    (`X > 0.9`): the value an alert tests, which exists even while the alert does not fire."""
    toks, depth, last = tokens(expr), 0, None
    for i, t in enumerate(toks):
        if t.text in "({[":
            depth += 1
        elif t.text in ")}]":
            depth -= 1
        elif depth == 0 and t.kind == "op" and t.text in COMPARISONS:
            last = i
    if last is None:
        return None
    rest = [t for t in toks[last + 1:] if t.text != "bool"]
    if len(rest) != 1 or rest[0].kind != "num":
        return None
    return expr[:toks[last].start].strip()


# -- promtool --------------------------------------------------------------------------------
def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def wait_for(what, timeout: float = 30, interval: float = 0.1, alive=lambda: None):
    """Poll `what()` until it returns something true (the caller asserts on the answer);
    the last answer if it never does within `timeout`. `alive()` raises to stop early."""
    deadline = time.monotonic() + timeout
    while not (answer := what()) and time.monotonic() < deadline:
        alive()
        time.sleep(interval)
    return answer


# -- a real Prometheus -------------------------------------------------------------------------
class Prometheus:
    """`prometheus` on 127.0.0.1:`port`, scraping `targets` every second and evaluating
    `rule_files` every second; its TSDB and log live in `base`. stop() kills it and removes
    the TSDB: call it from a finalizer."""

    def __init__(self, base: str, port: int, targets: list[str], rule_files: list[str] = (),
                 job: str = "strata"):
        self.base, self.port, self.job = str(base), port, job
        self.tsdb = os.path.join(self.base, "tsdb")
        self.config = os.path.join(self.base, "prometheus.yml")
        self.log = os.path.join(self.base, "prometheus.log")
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        with open(self.config, "w") as f:
            yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                           "scrape_timeout": "1s"},
                "rule_files": [os.path.abspath(p) for p in rule_files],
                "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
            }, f, sort_keys=False)

    def start(self, timeout: float = 30) -> "Prometheus":
        check = promtool("check", "config", self.config)
        if check.returncode:
            raise RuntimeError(f"promtool check config:\n{check.stdout}{check.stderr}")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.tsdb}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{self.read_log()}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its group
            self.proc.wait(timeout=30)
            self.proc = None
        shutil.rmtree(self.tsdb, ignore_errors=True)

    def read_log(self) -> str:
        return read_text(self.log)

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/`path`: the decoded answer, errors included (status "error")."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query, with a JSON body
            return json.load(e)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def vector(self, expr: str) -> list[dict]:
        """The result of an instant query that must succeed."""
        answer = self.query(expr)
        if answer.get("status") != "success":
            raise AssertionError(f"{expr}: {answer.get('errorType')}: {answer.get('error')}")
        result = answer["data"]["result"]
        return result if answer["data"]["resultType"] == "vector" else [result]

    def value(self, expr: str) -> float | None:
        result = self.vector(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {len(result)} series"
        return float(result[0]["value"][1])

    def scrapes(self) -> int:
        """Successful scrapes of the job's targets in the last minute (the fewest of any)."""
        counts = self.vector(f'sum_over_time(up{{job="{self.job}"}}[1m])')
        ups = self.vector(f'up{{job="{self.job}"}}')
        if not counts or not ups or any(u["value"][1] != "1" for u in ups):
            return 0
        return min(int(float(c["value"][1])) for c in counts)

    def wait(self, what, timeout: float = 30):
        """wait_for(what) while the server runs."""
        def alive():
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.read_log()}")

        return wait_for(what, timeout, alive=alive)

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["data"]["groups"] for r in g["rules"]]
