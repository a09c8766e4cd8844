"""The .proto files, the generated code in unclip/v1/, and buf lint agree."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "unclip" / "v1"
GENERATED_DIR = ROOT / "unclip" / "v1"
GEN_PROTOS = ROOT / "tools" / "gen_protos.py"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"

# service -> rpc -> (client streaming, server streaming)
EXPECTED_SERVICES = {
    "ClipEncoderService": {"GetEncoderInfo": (False, False), "EncodeText": (False, False), "EncodeImage": (False, False)},
    "PriorService": {"GetPriorInfo": (False, False), "Sample": (False, False)},
    "DecoderService": {"GetDecoderInfo": (False, False), "Decode": (False, False), "DecodeStream": (False, True)},
    "UpsamplerService": {"GetUpsamplerInfo": (False, False), "Upsample": (False, False)},
    "ImageService": {
        "Generate": (False, False),
        "GenerateStream": (False, True),
        "CreateVariations": (False, False),
        "Interpolate": (False, False),
        "TextDiff": (False, False),
        "Edit": (False, False),
    },
}


def run(args: list[str], cwd: Path, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def copy_repo_parts(destination: Path) -> Path:
    for part in ("protos", "tools", "unclip/v1"):
        shutil.copytree(ROOT / part, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def add_field_to_tensor_proto(root: Path) -> None:
    path = root / "protos" / "unclip" / "v1" / "tensor.proto"
    text = path.read_text()
    marker = "  bytes data = 3;\n"
    assert marker in text, "tensor.proto changed shape; update this test"
    path.write_text(text.replace(marker, marker + "  // Added by the test.\n  string layout = 4;\n"))


# ---------------------------------------------------------------------------------------------
# gen_protos.py --check


def test_generated_code_is_current():
    result = run([sys.executable, str(GEN_PROTOS), "--check"], cwd=ROOT)
    assert result.returncode == 0, f"unclip/v1 is stale; run python tools/gen_protos.py\n{result.stderr}"
    assert result.stderr == ""


def test_check_detects_a_stale_file(tmp_path):
    copy = copy_repo_parts(tmp_path / "repo")
    script = str(copy / "tools" / "gen_protos.py")
    # The unmodified copy passes, so a failure below is caused by the edit alone.
    pristine = run([sys.executable, script, "--check"], cwd=copy)
    assert pristine.returncode == 0, pristine.stderr

    add_field_to_tensor_proto(copy)
    result = run([sys.executable, script, "--check"], cwd=copy)
    assert result.returncode == 1, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith(("stale:", "missing:", "not generated"))]
    assert sorted(problems) == ["stale: unclip/v1/tensor_pb2.py", "stale: unclip/v1/tensor_pb2.pyi"], result.stderr
    assert "run: python tools/gen_protos.py" in result.stderr
    # The check only reads: the committed code in the copy is unchanged.
    assert (copy / "unclip/v1/tensor_pb2.py").read_bytes() == (GENERATED_DIR / "tensor_pb2.py").read_bytes()

    # Regenerating fixes it, and the new field is in the generated code.
    regenerated = run([sys.executable, script], cwd=copy)
    assert regenerated.returncode == 0, regenerated.stderr
    assert "layout" in (copy / "unclip/v1/tensor_pb2.pyi").read_text()
    assert run([sys.executable, script, "--check"], cwd=copy).returncode == 0


def test_check_detects_missing_and_orphaned_files(tmp_path):
    copy = copy_repo_parts(tmp_path / "repo")
    (copy / "protos/unclip/v1/extra.proto").write_text(
        'syntax = "proto3";\n\npackage unclip.v1;\n\nmessage Extra {\n  int32 x = 1;\n}\n'
    )
    (copy / "unclip/v1/tensor_pb2_grpc.py").unlink()
    (copy / "unclip/v1/retired_pb2.py").write_text("# generated from a .proto that no longer exists\n")
    result = run([sys.executable, str(copy / "tools" / "gen_protos.py"), "--check"], cwd=copy)
    assert result.returncode == 1
    lines = set(result.stderr.splitlines())
    assert {
        "missing: unclip/v1/extra_pb2.py",
        "missing: unclip/v1/extra_pb2.pyi",
        "missing: unclip/v1/extra_pb2_grpc.py",
        "missing: unclip/v1/tensor_pb2_grpc.py",
        "not generated from any .proto: unclip/v1/retired_pb2.py",
    } <= lines, result.stderr
    assert not any(line.startswith("stale:") for line in lines), result.stderr


# ---------------------------------------------------------------------------------------------
# buf


def buf_or_fail() -> Path:
    if not (BUF.is_file() and os.access(BUF, os.X_OK)):  # `make test` installs it
        pytest.fail(f"buf not installed at {BUF.relative_to(ROOT)}; install it with `make tools`")
    return BUF


def buf_env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"BUF_CACHE_DIR": str(tmp_path / "buf-cache")}


def test_buf_lint(tmp_path):
    buf = buf_or_fail()
    result = run([str(buf), "lint", "protos"], cwd=ROOT, env=buf_env(tmp_path))
    assert result.returncode == 0, f"buf lint protos failed:\n{result.stdout}{result.stderr}"
    assert result.stdout.strip() == ""


def test_buf_lint_catches_violations(tmp_path):
    """Proves the lint test above can fail: a badly named field in a copy is reported."""
    buf = buf_or_fail()
    copy = copy_repo_parts(tmp_path / "repo")
    path = copy / "protos/unclip/v1/tensor.proto"
    path.write_text(path.read_text().replace("  bytes data = 3;\n", "  bytes data = 3;\n  int32 BadName = 4;\n"))
    result = run([str(buf), "lint", "protos"], cwd=copy, env=buf_env(tmp_path))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "protos/unclip/v1/tensor.proto" in output and '"BadName" should be lower_snake_case' in output, output


def test_buf_build_declares_expected_services(tmp_path):
    buf = buf_or_fail()
    image = tmp_path / "image.binpb"
    result = run([str(buf), "build", "protos", "-o", str(image)], cwd=ROOT, env=buf_env(tmp_path))
    assert result.returncode == 0, result.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
    assert services_in(files) == EXPECTED_SERVICES


# ---------------------------------------------------------------------------------------------
# Services in the sources vs. the generated code


def services_in(files: descriptor_pb2.FileDescriptorSet) -> dict[str, dict[str, tuple[bool, bool]]]:
    found: dict[str, dict[str, tuple[bool, bool]]] = {}
    for file in files.file:
        if not file.name.startswith("unclip/"):
            continue
        assert file.package == "unclip.v1", file.name
        for service in file.service:
            assert service.name not in found, f"{service.name} declared twice"
            found[service.name] = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    return found


def proto_source_descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "set.binpb"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", "--include_imports", f"--descriptor_set_out={out}", *protos]
    )
    assert status == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def generated_services() -> dict[str, tuple[object, object, object]]:
    """service name -> (service descriptor, *_pb2_grpc module, *_pb2 module) from unclip/v1."""
    found = {}
    for path in sorted(GENERATED_DIR.glob("*_pb2.py")):
        pb2 = importlib.import_module(f"unclip.v1.{path.stem}")
        grpc_module = importlib.import_module(f"unclip.v1.{path.stem}_grpc")
        for name, service in pb2.DESCRIPTOR.services_by_name.items():
            assert name not in found
            found[name] = (service, grpc_module, pb2)
    return found


def test_proto_sources_declare_expected_services(tmp_path):
    assert services_in(proto_source_descriptor_set(tmp_path)) == EXPECTED_SERVICES


def test_every_proto_file_has_generated_modules():
    stems = {p.stem for p in PROTO_DIR.glob("*.proto")}
    assert stems  # the glob found the sources
    for stem in stems:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (GENERATED_DIR / f"{stem}{suffix}").is_file(), f"{stem}{suffix}"
        module = importlib.import_module(f"unclip.v1.{stem}_pb2")
        assert module.DESCRIPTOR.name == f"unclip/v1/{stem}.proto"


def test_generated_services_match_expected():
    services = generated_services()
    assert set(services) == set(EXPECTED_SERVICES)
    for name, rpcs in EXPECTED_SERVICES.items():
        service, grpc_module, pb2 = services[name]
        assert service.full_name == f"unclip.v1.{name}"
        methods = service.methods_by_name
        assert {m: (methods[m].client_streaming, methods[m].server_streaming) for m in methods} == rpcs
        for rpc in rpcs:
            method = methods[rpc]
            assert method.input_type.full_name == f"unclip.v1.{rpc}Request"
            assert method.output_type.full_name == f"unclip.v1.{rpc}Response"
            # The message classes exist in the module next to the service.
            assert getattr(pb2, f"{rpc}Request").DESCRIPTOR is method.input_type
            assert getattr(pb2, f"{rpc}Response").DESCRIPTOR is method.output_type
        # gRPC plumbing for the service exists and covers every RPC.
        servicer = getattr(grpc_module, f"{name}Servicer")
        assert callable(getattr(grpc_module, f"add_{name}Servicer_to_server"))
        for rpc in rpcs:
            assert callable(getattr(servicer, rpc)), f"{name}Servicer.{rpc}"


def test_stubs_use_the_right_call_types():
    services = generated_services()
    channel = grpc.insecure_channel("127.0.0.1:1")  # never connected: stubs are built lazily
    try:
        for name, rpcs in EXPECTED_SERVICES.items():
            _, grpc_module, _ = services[name]
            stub = getattr(grpc_module, f"{name}Stub")(channel)
            for rpc, (client_streaming, server_streaming) in rpcs.items():
                callable_ = getattr(stub, rpc)
                expected = {
                    (False, False): grpc.UnaryUnaryMultiCallable,
                    (False, True): grpc.UnaryStreamMultiCallable,
                }[(client_streaming, server_streaming)]
                assert isinstance(callable_, expected), f"{name}.{rpc}: {type(callable_)}"
    finally:
        channel.close()


def test_generated_code_imports_in_a_fresh_interpreter():
    """Every generated module imports on its own (no hidden import-order dependencies)."""
    modules = sorted(p.stem for p in GENERATED_DIR.glob("*_pb2*.py"))
    assert len(modules) == 2 * len(list(PROTO_DIR.glob("*.proto")))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('unclip.v1.' + m)\n"
    for module in modules:
        result = run([sys.executable, "-c", code, module], cwd=ROOT)
        assert result.returncode == 0, f"{module}: {result.stderr}"
