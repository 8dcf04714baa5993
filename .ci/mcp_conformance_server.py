"""The MCP conformance suite's server scenarios against the test file's conformance fixture
(`test_llmhost.py mcp-fixture`), once directly and once through `llmhost.py serve` at
/mcp/fixture, at each revision's requirements (`conformance server --requirements REV`): one
table per revision, scenario by scenario, the checks each passed and failed on either side.

Usage: python3 .ci/mcp_conformance_server.py CONFORMANCE_BIN OUT_DIR
Exit 0 when every scenario a revision scores passes on both sides and no scenario (scored or
not) does worse through llmhost than directly.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_mcp import serve_in_front, wait_port  # noqa: E402  (its neighbour in .ci)

REVISIONS = ("2025-11-25", "2026-07-28")
BAD = ("FAILURE",)


def scored(conformance, revision):
    """The `server:` list of the suite's requirements/REV.yaml."""
    package = os.path.join(os.path.dirname(os.path.realpath(conformance)), "..")
    with open(os.path.join(package, "requirements", f"{revision}.yaml")) as f:
        text = f.read()
    block = re.search(r"^server:\n((?:  - .*\n)+)", text, re.M)
    return [line[4:].strip() for line in block.group(1).splitlines()]


def run_suite(conformance, url, revision, out):
    """-> {scenario: (passed, failed)} of one `conformance server --requirements` run."""
    shutil.rmtree(out, ignore_errors=True)  # (each run adds folders named by the time)
    subprocess.run([conformance, "server", "--url", url, "--requirements", revision,
                    "-o", out, "--timeout", "60000"], stdout=open(out + ".log", "w"),
                   stderr=subprocess.STDOUT, check=False)
    results = {}
    for path in glob.glob(os.path.join(out, "server-*", "checks.json")):
        scenario = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", os.path.basename(
            os.path.dirname(path)))
        with open(path) as f:
            checks = json.load(f)
        failed = sum(c["status"] in BAD for c in checks)
        results[scenario] = (sum(c["status"] == "SUCCESS" for c in checks), failed)
    return results


def main():
    conformance, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    fixture = subprocess.Popen([sys.executable, os.path.join(ROOT, "test_llmhost.py"),
                                "mcp-fixture"], stdout=subprocess.PIPE, text=True)
    port = int(fixture.stdout.readline().split()[1])
    serve, gateway = serve_in_front("fixture", port)
    ok = True
    try:
        wait_port(port, fixture)
        wait_port(gateway, serve)
        sides = (("fixture", f"http://127.0.0.1:{port}/mcp"),
                 ("llmhost", f"http://127.0.0.1:{gateway}/mcp/fixture"))
        for revision in REVISIONS:
            runs = {name: run_suite(conformance, url, revision,
                                    os.path.join(work, f"server-{revision}-{name}"))
                    for name, url in sides}
            required = scored(conformance, revision)
            names = required + sorted(set().union(*runs.values()) - set(required))
            print(f"\nServer scenarios at {revision} (checks passed/failed; * = not scored)")
            print(f"{'scenario':52} {'fixture':>9} {'llmhost':>9}  same")
            totals = {name: [0, 0] for name, _ in sides}
            for scenario in names:
                cells = []
                for name, _ in sides:
                    p, f = runs[name].get(scenario, (0, 1))
                    cells.append((p, f))
                    if scenario in required and f == 0:
                        totals[name][0] += 1
                    totals[name][1] += scenario in required
                same = cells[0] == cells[1]
                worse = cells[1][1] > cells[0][1]
                if worse or scenario in required and cells[1][1]:
                    ok = False
                mark = "" if scenario in required else "*"
                print(f"{scenario + mark:52} {'%d/%d' % cells[0]:>9} {'%d/%d' % cells[1]:>9}"
                      f"  {'yes' if same else 'WORSE' if worse else 'no'}")
            print("scored scenarios passed: " + ", ".join(
                f"{name} {n}/{of}" for name, (n, of) in totals.items()))
    finally:
        for proc in (serve, fixture):
            proc.terminate()
            proc.wait(10)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
