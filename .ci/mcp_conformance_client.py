"""The client the official MCP conformance suite runs: `python3 .ci/mcp_conformance_client.py URL`.

Every MCP action goes through llmhost's own CLI, as a user would run it:
`llmhost.py mcp tools --url URL --json` to connect and list, then `llmhost.py mcp call --url URL
TOOL ARGS` per tool, and `mcp resources` / `mcp read` / `mcp prompts` / `mcp prompt` for what the
server has besides. The suite describes a scenario in MCP_CONFORMANCE_SCENARIO and, for some, the
exact calls to make or the client's credentials in MCP_CONFORMANCE_CONTEXT; this script only picks
the arguments and flags. Authorization scenarios log in through llmhost's browser step, with
BROWSER set to .ci/oauth_browser.py (it follows the redirect to llmhost's loopback listener);
tokens go to a registry of this run's own, in a temporary folder.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LLMHOST = [sys.executable, os.path.join(HERE, "..", "llmhost.py")]
BROWSER = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'oauth_browser.py'))} %s"
SAMPLE = {"string": "test", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
# What the suite's reference client offers as its Client ID Metadata Document
CIMD_URL = "https://conformance-test.local/client-metadata.json"


def arguments_for(schema):
    props = (schema or {}).get("properties") or {}
    return {k: p.get("default", SAMPLE.get(p.get("type"), "test")) for k, p in props.items()}


def oauth_flags(scenario, context, folder, env):
    """The OAuth flags for a scenario's credentials (secrets by environment variable or file)."""
    if not scenario.startswith("auth/"):
        return []
    flags = []
    if context.get("client_secret"):
        env["CONFORMANCE_CLIENT_SECRET"] = context["client_secret"]
    if scenario.startswith("auth/client-credentials"):
        flags = ["--client-credentials", "--client-id", context["client_id"]]
        if context.get("private_key_pem"):
            key = os.path.join(folder, "client-key.pem")
            with open(key, "w") as f:
                f.write(context["private_key_pem"])
            return flags + ["--client-key", key]
        return flags + ["--client-secret-env", "CONFORMANCE_CLIENT_SECRET"]
    if context.get("client_id"):
        flags += ["--client-id", context["client_id"]]
        if context.get("client_secret"):
            flags += ["--client-secret-env", "CONFORMANCE_CLIENT_SECRET"]
    return flags + ["--client-metadata-url", CIMD_URL]


def main(url):
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    with tempfile.TemporaryDirectory(prefix="llmhost-conformance-") as folder:
        env = dict(os.environ, BROWSER=BROWSER)
        registry = ["--registry", os.path.join(folder, "servers.json")]
        target = ["--url", url] + oauth_flags(scenario, context, folder, env)

        def llmhost(*argv):
            result = subprocess.run(LLMHOST + registry + list(argv) + target, env=env,
                                    capture_output=True, text=True, timeout=120)
            sys.stderr.write(result.stderr)
            print(f"llmhost {' '.join(argv[:3])} -> exit {result.returncode}", file=sys.stderr)
            if result.returncode:
                sys.stderr.write(result.stdout)
            return result.stdout if result.returncode == 0 else None

        listing = llmhost("mcp", "tools", "--json")
        if not listing:
            return 1
        tools = json.loads(listing)
        planned = context.get("toolCalls")
        calls = [(c["name"], c.get("arguments") or {}) for c in planned or ()]
        if not planned:
            for tool in tools:
                args = arguments_for(tool.get("inputSchema"))
                if scenario == "json-schema-2020-12-preservation" and tool["name"] == "json_schema_echo":
                    # echo the other tool's schema as models see it: proves it reached them verbatim
                    args = {"schema": next(t["inputSchema"] for t in tools if t is not tool)}
                calls.append((tool["name"], args))
        for name, args in calls:
            llmhost("mcp", "call", name, json.dumps(args))
        if scenario.startswith("auth/"):
            return 0
        for resource in json.loads(llmhost("mcp", "resources") or "{}").get("resources", ()):
            llmhost("mcp", "read", resource["uri"])
        for prompt in json.loads(llmhost("mcp", "prompts") or "[]"):
            args = {a["name"]: "test" for a in prompt.get("arguments") or ()}
            llmhost("mcp", "prompt", prompt["name"], json.dumps(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[-1]))
