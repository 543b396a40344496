"""The README says what the code does: its first lines give the two commands, every `d2d` command in its
code blocks parses with the CLI, its configuration table names exactly the `D2D_` variables the code
reads, and its API tables give every method of every service with the roles its contract allows."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from google.protobuf.descriptor import ServiceDescriptor

from d2d import auth, bus
from d2d.cli import build_parser
from d2d.runtime.services import APIS, SERVICES
from d2d.v1 import access_pb2, audit_pb2, features_pb2, feedback_pb2, ingest_pb2, registry_pb2, serving_pb2
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
PROTO_MODULES = (ingest_pb2, features_pb2, registry_pb2, access_pb2, serving_pb2, feedback_pb2, audit_pb2)
# NATS stream names spelled like variables; the code never reads them from the environment.
STREAM_NAMES = {bus.EVENTS_STREAM, bus.INGEST_STREAM}


def section(title: str) -> str:
    """The README's `## title` section, up to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def code_block_commands() -> list[list[str]]:
    """Every shell command in the README's bash code blocks, as argv lists (`&&`, `|`, `;` split)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M):
        for line in block.splitlines():
            words: list[str] = []
            for token in shlex.split(line, comments=True):
                if token in ("&&", "|", ";", "||"):
                    commands.append(words)
                    words = []
                else:
                    words.append(token)
            commands.append(words)
    return [c for c in commands if c]


def test_the_first_lines_give_the_command_that_runs_the_demo_and_the_one_that_runs_the_tests() -> None:
    lines = README.splitlines()
    assert lines[:3] == ["# Data2Data", "", "```bash"]
    assert re.search(r"\bd2d (demo|up)\b", lines[3]) and "pip install" in lines[3], lines[3]
    assert lines[4].startswith("bash scripts/test.sh"), lines[4]


def test_every_d2d_command_in_the_readmes_code_blocks_parses() -> None:
    d2d_commands = [c for c in code_block_commands() if Path(c[0]).name == "d2d"]
    assert len(d2d_commands) >= 15  # the tour
    parser = build_parser()
    refused = []
    for argv in d2d_commands:
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            refused.append(shlex.join(argv))
    assert refused == []


def test_every_cli_command_group_is_in_the_commands_table() -> None:
    commands = section("Commands")
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if a.dest == "command"]
    missing = [name for name in subparsers.choices if f"`d2d {name}" not in commands]
    assert missing == []


def env_names_in_code() -> set[str]:
    """Every `D2D_` name the code of d2d/ and services/ spells out (as a string on its own), and the
    address variables d2d.runtime.services derives for each gRPC service."""
    names = set()
    for folder in ("d2d", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts:  # generated protobuf code
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if re.fullmatch(r"D2D_[A-Z0-9_]+", node.value):
                        names.add(node.value)
    return (names - STREAM_NAMES) | {spec.addr_env for spec in APIS}


def configuration_table() -> dict[str, str]:
    """Variable -> default, from the rows of the configuration table."""
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", section("Configuration"), re.M)
    return {name: default.strip() for name, default in rows}


def test_the_configuration_table_names_every_variable_the_code_reads_and_no_other() -> None:
    table = configuration_table()
    in_code = env_names_in_code()
    documented = {name for name in table if name.startswith("D2D_")}
    assert sorted(in_code - documented) == [], "read by the code but not in the README's configuration table"
    assert sorted(documented - in_code) == [], "in the README's configuration table but read nowhere"
    sources = "\n".join(p.read_text() for folder in ("d2d", "services") for p in (ROOT / folder).rglob("*.py"))
    others = [name for name in table if not name.startswith("D2D_")]
    assert [name for name in others if f'"{name}"' not in sources] == []


def test_the_configuration_table_gives_each_services_default_address() -> None:
    table = configuration_table()
    wrong = {
        spec.addr_env: table.get(spec.addr_env) for spec in APIS if table.get(spec.addr_env) != f"`{spec.default_addr}`"
    }
    assert wrong == {}


def services_in_protos() -> list[ServiceDescriptor]:
    return [s for module in PROTO_MODULES for s in module.DESCRIPTOR.services_by_name.values()]


def api_tables() -> dict[str, tuple[str, str, dict[str, set[str]]]]:
    """Service -> (process, default address, {method: roles}) from the README's API tables."""
    tables = {}
    text = section("Calling the platform")
    for match in re.finditer(r"^#### (\w+): process `([\w-]+)`, ([\d.:]+)\n(.*?)(?=^#|\Z)", text, re.S | re.M):
        name, process, addr, body = match.groups()
        rows = re.findall(r"^\| `(\w+)` \| ([a-z, ]+) \|", body, re.M)
        tables[name] = (process, addr, {method: {r.strip() for r in roles.split(",")} for method, roles in rows})
    return tables


@pytest.mark.parametrize("service", services_in_protos(), ids=lambda s: s.name)
def test_the_api_table_gives_every_method_with_the_roles_its_contract_allows(service: ServiceDescriptor) -> None:
    tables = api_tables()
    assert service.name in tables, f"README has no table for {service.name}"
    _, _, methods = tables[service.name]
    assert sorted(methods) == sorted(m.name for m in service.methods)
    wrong = {
        m.name: sorted(methods[m.name]) for m in service.methods if methods[m.name] | {auth.ADMIN} != auth.roles_of(m)
    }
    assert wrong == {}, "roles differ from the allowed_roles in protos/"


def test_the_api_tables_name_each_services_process_and_default_address() -> None:
    tables = api_tables()
    assert sorted(tables) == sorted(s.name for s in services_in_protos())
    processes = {spec.name: spec for spec in SERVICES if spec.api}
    for name, (process, addr, _) in tables.items():
        assert process in processes, f"{name} is hosted by {process}, which serves no gRPC API"
        spec = processes[process]
        assert addr == spec.default_addr, name
        if spec.api.endswith(f".{name}"):
            continue
        assert name == "AccessService" and process == "registry"  # the one service a process hosts beside its own


def test_the_python_snippet_is_the_examples_own_code() -> None:
    [snippet] = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
    example = (ROOT / "examples" / "python" / "predict.py").read_text()
    lines = {line.replace("# fmt: skip", "").strip() for line in example.splitlines()}
    assert [line for line in snippet.splitlines() if line.strip() and line.strip() not in lines] == []
