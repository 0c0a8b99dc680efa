"""The shape of the code base: no import cycles, short functions, a light `import lmforge`,
tests that need nothing beside the clone, and one definition of the generation settings."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import build_parser, flags_for
from lmforge.cli.common import generation_config
from lmforge.errors import UserError
from lmforge.generation_config import GenerationConfig, generation_settings

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "lmforge"


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = ("lmforge", *f.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts).removesuffix(".__init__")] = f
    return out


def _import_graph() -> dict[str, set[str]]:
    """Every lmforge module → the lmforge modules it imports, at the top or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "lmforge"}
    return graph


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "lmforge.training.trainer" in graph["lmforge.cli"] or graph["lmforge.cli"]  # the graph is real
    assert "lmforge.interop.hf" in graph["lmforge.checkpoint"]  # foreign formats sit below the owner
    assert "lmforge.checkpoint" not in graph["lmforge.interop.hf"]


# The families' own code: their model files, their declarations (lmforge/families), and the modules
# that hold one family's data, training, decoding or Hugging Face mapping.
FAMILY_CODE = ("lmforge.models", "lmforge.families", "lmforge.seq2seq", "lmforge.interop.mbart",
               "lmforge.interop.bert", "lmforge.interop.hf", "lmforge.interop.gguf", "lmforge.classification")  # fmt: skip
FAMILY_CHECK = re.compile(
    r"""\.arch\s*(==|!=)|\.arch\s+(not\s+)?in\s|\bis_seq2seq\b|[=!]=\s*"(gpt|lstm|gru|rnn|seq2seq|encoder)"|"""
    r"""["'](stateful|is_encoder_decoder|is_masked_lm)["']"""
)


def test_no_family_check_outside_the_families_code():
    """The stages ask a model's family (lmforge.families.family_of) and never test its name."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith(FAMILY_CODE):
            continue
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if FAMILY_CHECK.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders
    # The pattern is real: it finds the checks the stages used to make.
    for line in ('if config.model.arch == "seq2seq":', 'language_model = m.arch not in ("seq2seq",)',
                 'getattr(run.model, "stateful", False)', 'if is_seq2seq(config):',
                 'getattr(self.engine.model, "is_encoder_decoder", False)'):  # fmt: skip
        assert FAMILY_CHECK.search(line), line


def test_lower_layers_never_import_upper_ones():
    """The checkpoint, inference, interop and family code never import training (nor the CLI), and the
    families import no stage at all: they name their stages' functions (`lazy`)."""
    graph = _import_graph()
    # (a family's package holds modules of several layers: its model and Hugging Face mapping sit low)
    lower = ("lmforge.checkpoint", "lmforge.inference", "lmforge.interop", "lmforge.families",
             "lmforge.seq2seq.model", "lmforge.seq2seq.bart", "lmforge.seq2seq.t5", "lmforge.classification.model",
             "lmforge.classification.inference", "lmforge.serving")  # fmt: skip
    training = (
        "lmforge.training",
        "lmforge.seq2seq.training",
        "lmforge.classification.training",
        "lmforge.cli",
    )
    for module, imports in graph.items():
        if module.startswith(lower):
            upward = {t for t in imports if t.startswith(training)}
            assert not upward, (module, upward)
    for module in (m for m in graph if m.startswith("lmforge.families")):
        assert all(t.startswith(("lmforge.families", "lmforge.errors")) for t in graph[module]), module


def test_functions_stay_readable():
    """No function over 80 lines unless a `# long:` comment on its first line says why."""
    too_long = []
    for name, path in _modules().items():
        lines = path.read_text("utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80 and "# long:" not in lines[node.lineno - 1]:
                    too_long.append(f"{name}.{node.name} ({length} lines)")
    assert not too_long


def test_nothing_reads_config_json_by_hand_but_the_checkpoint_readers():
    readers = {"lmforge.checkpoint", "lmforge.interop.hf"}
    offenders = [
        name
        for name, path in _modules().items()
        if name not in readers and '"config.json").read_text' in path.read_text("utf-8")
    ]
    assert not offenders


def test_import_lmforge_and_the_cli_parser_load_no_torch():
    code = (
        "import sys, lmforge, lmforge.cli; lmforge.cli.build_parser(); "
        "print('torch' in sys.modules, 'numpy' in sys.modules, lmforge.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:2] == ["False", "False"] and out[2] == "0.1.0"
    # ...and the lazy names still resolve to the real objects
    import lmforge
    from lmforge.training.trainer import train

    assert lmforge.train is train and lmforge.GenerationConfig is GenerationConfig


def test_tests_need_nothing_beside_the_clone():
    """The suite reads its data from tests/data; the shared data sets are for benchmarks."""
    beside = "shared" + "/data"  # (spelled apart so that this file does not match itself)
    users = [p.name for p in (REPO / "tests").glob("*.py") if beside in p.read_text("utf-8")]
    assert not users
    for name in ("tinyshakespeare-head.txt", "sst2-dev-sample.tsv", "eng-fra-dev-sample.tsv"):
        size = (REPO / "tests" / "data" / name).stat().st_size
        assert 1_000 < size < 1_000_000


# ---- one definition of the generation settings ---------------------------------------------------


def test_cli_flags_and_server_fields_are_made_from_generation_config():
    from lmforge.serving.protocol import ChatRequest, CompletionRequest

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "chat"):
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        for name, *_ in generation_settings():
            assert "--" + name.replace("_", "-") in flags, (command, name)
    api = [name for name, *_, in_api in generation_settings() if in_api]
    assert {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"} <= set(api)
    for request in (CompletionRequest, ChatRequest):
        for name, _, default, help_text, bounds, in_api in generation_settings():
            if in_api:
                field = request.model_fields[name]
                assert field.default == default and field.description == help_text
                limits = {
                    type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in field.metadata
                }
                assert limits == bounds, name
    # The same range is enforced everywhere: the library, the CLI and the server.
    with pytest.raises(UserError, match="top_p must be above 0 and at most 1, not 1.5"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(UserError, match="temperature must be at least 0 and at most 5, not inf"):
        GenerationConfig(temperature=float("inf"))
    with pytest.raises(UserError, match="seed must be at least 0"):
        GenerationConfig(seed=2**64)
    with pytest.raises(Exception, match="less than or equal to 1"):
        CompletionRequest(prompt="x", top_p=1.5)
    assert CompletionRequest(prompt="x", top_k=5).generation_config(7, ["\n"]) == GenerationConfig(
        max_new_tokens=7, stop=("\n",), top_k=5
    )


def test_cli_escapes_in_stop_strings_and_generated_defaults():
    parser = build_parser()
    args = parser.parse_args(
        ["generate", "ckpt", "--stop", r"\n\n", "--stop", "END", "--top-k", "3", "--no-stop-at-eot"]
    )
    assert args.stop == ["\n\n", "END"] and args.top_k == 3 and args.stop_at_eot is False
    assert args.device == "auto"
    config = generation_config(args)  # the command's defaults under the flags given
    assert config == GenerationConfig(max_new_tokens=200, temperature=0.8, top_k=3, stop=("\n\n", "END"),
                                      stop_at_eot=False)  # fmt: skip
    # A checkpoint's recommended settings (generation_config.json) beat the command's defaults,
    # and flags beat both.
    assert generation_config(args, {"temperature": 0.2, "top_k": 50}).temperature == 0.2
    assert generation_config(args, {"temperature": 0.2, "top_k": 50}).top_k == 3
    chat = parser.parse_args(["chat", "ckpt", "--temperature", "0"])
    assert generation_config(chat, {"temperature": 0.6}, max_new_tokens=10) == GenerationConfig(
        max_new_tokens=10, temperature=0.0, top_p=0.95
    )
    assert chat.dtype == "float32"


def test_library_errors_name_settings_and_the_cli_adds_the_flags():
    parser = build_parser()
    assert flags_for(parser, "eval", ("stride", "data")) == ["--stride", "--data"]
    assert flags_for(parser, "train", ("data.encoding", "train.out", "resume")) == [
        "--data.encoding",
        "--out",
        "--resume",
    ]
    assert flags_for(parser, "generate", ("strict", "nonexistent")) == ["--strict"]
    error = UserError("stride must be between 1 and the context (4), not 5.", settings=("stride",))
    assert "--" not in str(error) and error.settings == ("stride",)


def test_code_is_ruff_clean_and_formatted():
    targets = [str(REPO / d) for d in ("src", "tests", "benchmarks")]
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *targets], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
