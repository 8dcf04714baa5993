"""The client the official MCP conformance suite runs: `python3 .ci/mcp_conformance_client.py URL`.

Every MCP action goes through llmhost's own CLI, as a user would run it:
`llmhost.py mcp tools --url URL --json` to connect and list, then `llmhost.py mcp call --url URL
TOOL ARGS` per tool. The suite describes a scenario in MCP_CONFORMANCE_SCENARIO and, for some,
the exact calls to make in MCP_CONFORMANCE_CONTEXT; this script only picks the arguments.
"""
import json
import os
import subprocess
import sys

LLMHOST = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "llmhost.py")]
SAMPLE = {"string": "test", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}


def llmhost(*argv):
    result = subprocess.run(LLMHOST + list(argv), capture_output=True, text=True, timeout=120)
    sys.stderr.write(result.stderr)
    print(f"llmhost {' '.join(argv[:4])} -> exit {result.returncode}", file=sys.stderr)
    return result


def arguments_for(schema):
    props = (schema or {}).get("properties") or {}
    return {k: p.get("default", SAMPLE.get(p.get("type"), "test")) for k, p in props.items()}


def main(url):
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    listing = llmhost("mcp", "tools", "--url", url, "--json")
    if listing.returncode != 0:
        return 1
    tools = json.loads(listing.stdout)
    planned = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}").get("toolCalls")
    calls = [(c["name"], c.get("arguments") or {}) for c in planned or ()]
    if not planned:
        for tool in tools:
            args = arguments_for(tool.get("inputSchema"))
            if scenario == "json-schema-2020-12-preservation" and tool["name"] == "json_schema_echo":
                # echo the other tool's schema as models see it: proves it reached them verbatim
                args = {"schema": next(t["inputSchema"] for t in tools if t is not tool)}
            calls.append((tool["name"], args))
    for name, args in calls:
        llmhost("mcp", "call", "--url", url, name, json.dumps(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[-1]))
