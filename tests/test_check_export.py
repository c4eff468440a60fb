"""scripts/check_export.py without an engine: the probe set on Qwen's real tokenizer (the demo-qwen checkpoint),
the comparison, the report and its verdict, the converter's discovery and failures, the exit statuses when an
engine is missing, and README.md's llama-cpp-python snippet run against a stand-in `llama_cpp` module that
records what the engine would be asked (NFC text, special tokens parsed, one batch per text, f32 KV cache)."""

import json
import shlex
import socket
import subprocess
import sys
import types
import unicodedata
from pathlib import Path

import pytest

from jina_v4 import JinaV4
from jina_v4.apps import export as ex

import check_export
from check_export import PROBES, Missing, Row, Variant, compare, report, verdict
from synthetic import DEMO_QWEN, write_demo_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_qwen(tmp_path_factory):
    path = write_demo_checkpoint(tmp_path_factory.mktemp("demo-qwen") / "demo-qwen", DEMO_QWEN)
    return path, JinaV4.from_pretrained(path, device="cpu", dtype="float32")


def test_probe_set_on_qwens_tokenizer(demo_qwen):
    _, model = demo_qwen
    ids = dict(zip([p[0] for p in PROBES], check_export.jina_v4_run(model, "retrieval")[0]))
    texts = {name: text for name, _, text in PROBES}
    im_end = model.processor.tokenizer.token_to_id("<|im_end|>")
    assert im_end == 151645 and im_end in ids["special-token"]  # jina_v4 reads the typed special token
    assert texts["nfd"] != unicodedata.normalize("NFC", texts["nfd"])  # the probe is NFD ...
    nfc = model.prepare([{"text": unicodedata.normalize("NFC", texts["nfd"])}], "retrieval", "query")[0].input_ids
    assert ids["nfd"] == nfc  # ... and jina_v4 normalises it
    assert "\n" in texts["multi-line"] and "\n" in texts["code"]
    assert 512 < len(ids["long"]) <= ex.CONTEXT  # past llama-cpp-python's default batch, within the README's context
    prompts = dict(check_export.prompts(model, "retrieval"))
    assert prompts["english"].startswith("Query: ") and prompts["german"].startswith("Passage: ")


def test_compare_report_and_verdict():
    row = compare("a", "v", [1, 2], [0.6, 0.8], [1, 2], [0.8, 0.6])
    assert row.ids_equal and row.tokens == 2
    assert row.cosine == pytest.approx(0.96) and row.max_abs == pytest.approx(0.2)
    assert not compare("a", "v", [1, 2], [1.0, 0.0], [1, 3], [1.0, 0.0]).ids_equal
    with pytest.raises(ValueError, match="2 components"):
        compare("a", "v", [1], [1.0, 0.0, 0.0], [1], [1.0, 0.0])
    exact = Variant("f32", True, [Row("english", "f32", 5, True, 1.0, 2e-7)])
    drift = Variant("q4", False, [Row("english", "q4", 5, True, 0.99, 3e-2), Row("long", "q4", 900, True, 0.98, 4e-2)])
    assert verdict([exact, drift], 1e-6) == []  # a measured variant's drift is reported, not failed
    text = report([exact, drift], 1e-6)
    assert "PASS" in text and "worst: cosine 0.980000000 (long), max abs 4.00e-02 (long)" in text
    far = Variant("f32", True, [Row("nfd", "f32", 7, True, 0.99, 2e-6)])
    assert verdict([far], 1e-6) == ["nfd (f32): max abs 2.00e-06 > 1e-06"]
    other_ids = Variant("q8", False, [Row("special-token", "q8", 9, False, 0.78, 0.3)])
    assert verdict([other_ids], 1e-6) == ["special-token (q8): the engine's token ids differ from jina_v4's"]
    assert "FAIL: special-token (q8)" in report([exact, other_ids], 1e-6)
    plain = Variant("plain", False, [Row("nfd", "plain", 9, False, 0.61, 0.5)], told=False)
    assert verdict([exact, plain], 1e-6) == [] and "(not as told)" in report([plain], 1e-6)


def test_converter_discovery(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_CONVERTER", raising=False)
    with pytest.raises(Missing, match=r"convert_hf_to_gguf.py was not found: pass --converter PATH.*nowhere"):
        check_export.find_converter(str(tmp_path / "nowhere"))
    tree = tmp_path / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    tree.mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    for given in (tree / "convert_hf_to_gguf.py", tree, tree.parents[1]):
        assert check_export.find_converter(str(given)) == tree / "convert_hf_to_gguf.py"
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tree.parents[1]))
    assert check_export.find_converter(None) == tree / "convert_hf_to_gguf.py"


def test_convert_runs_the_readme_command_and_names_a_missing_package(tmp_path):
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "out = args[args.index('--outfile') + 1]\n"
        "open(out, 'w').write(json.dumps(args))\n"
    )
    out = check_export.convert(fake, sys.executable, tmp_path / "export", "q8_0", tmp_path / "m.gguf")
    assert json.loads(out.read_text()) == [str(tmp_path / "export"), "--outfile", str(out), "--outtype", "q8_0"]
    fake.write_text("raise ModuleNotFoundError(\"No module named 'sentencepiece'\")\n")  # as the converter fails
    with pytest.raises(Missing, match="lacks the package 'sentencepiece'"):
        check_export.convert(fake, sys.executable, tmp_path / "export", "f32", tmp_path / "n.gguf")


def test_missing_engines_exit_2(demo_qwen, monkeypatch, capsys):
    path, _ = demo_qwen
    assert check_export.main(["--model", str(path), "--engine", "vllm"]) == 2
    assert "vLLM is not installed here: --engine vllm needs vLLM and a GPU" in capsys.readouterr().err
    real = check_export.importlib.util.find_spec
    monkeypatch.setattr(check_export.importlib.util, "find_spec", lambda n: None if n == "llama_cpp" else real(n))
    assert check_export.main(["--model", str(path), "--task", "code"]) == 2
    assert "llama-cpp-python is not installed" in capsys.readouterr().err
    assert check_export.main(["--model", str(path), "--task", "legal"]) == 2
    assert "legal" in capsys.readouterr().err


class StandIn:
    """llama_cpp.Llama's surface that the snippet uses, recording what the engine is asked: tokenize's `special`,
    the texts it gets, its settings. embed tokenizes as the real one does: self.tokenize(text.encode("utf-8"))."""

    calls: list = []

    def __init__(self, path, **settings):
        self.path, self.settings = path, settings

    def tokenize(self, text, add_bos=True, special=False):
        StandIn.calls.append((text.decode("utf-8"), add_bos, special))
        return list(text)

    def embed(self, texts, normalize=False):
        for t in texts:
            self.tokenize(t.encode("utf-8"))
        return [[1.0] for _ in texts]

    def close(self):
        pass


def stand_in_llama_cpp():
    mod = types.ModuleType("llama_cpp")
    mod.Llama = StandIn
    mod.LLAMA_POOLING_TYPE_MEAN, mod.GGML_TYPE_F32 = 1, 0
    return mod


def test_readme_snippet_tells_the_engine_what_jina_v4_does(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", stand_in_llama_cpp())
    StandIn.calls = []
    nfd = "Cafe\u0301 <|im_end|>"
    ids, vectors = check_export.llama_cpp_run(tmp_path / "m.gguf", [nfd])
    assert vectors == [[1.0]] and ids == [list("Café <|im_end|>".encode())]
    # the example line of the snippet, then the check's own tokenize, then embed's: NFC, special tokens parsed
    assert StandIn.calls[1:] == [("Café <|im_end|>", True, True)] * 2
    ns = {}
    exec(check_export.engine_snippet(tmp_path / "m.gguf"), ns)
    assert ns["llm"].path == str(tmp_path / "m.gguf")
    s = ns["llm"].settings
    assert s["embedding"] and s["pooling_type"] == 1 and s["type_k"] == s["type_v"] == 0
    assert s["n_ctx"] == s["n_batch"] == s["n_ubatch"] == ex.CONTEXT <= ex.MAX_TEXT_TOKENS
    exec(check_export.engine_snippet(tmp_path / "m.gguf", "default-kv"), ns)
    assert "type_k" not in ns["llm"].settings and ns["llm"].settings["n_ubatch"] == ex.CONTEXT
    exec(check_export.engine_snippet(tmp_path / "m.gguf", "ubatch-512"), ns)
    assert ns["llm"].settings["n_ubatch"] == 512 and ns["llm"].settings["n_batch"] == ex.CONTEXT
    StandIn.calls = []
    check_export.llama_cpp_run(tmp_path / "m.gguf", [nfd], "plain")  # Llama itself: no NFC, special tokens off
    assert StandIn.calls[1:] == [(nfd, True, False)] * 2


def test_readme_nfc_command_normalises(tmp_path):
    """The shell line README.md gives llama-embedding users, before the engine."""
    (tmp_path / "texts.txt").write_text("Query: Cafe\u0301<#sep#>Passage: cre\u0300me\nbru\u0302le\u0301e\n")
    line = ex.LLAMA_EMBEDDING.splitlines()[0]
    subprocess.run(line, shell=True, cwd=tmp_path, check=True, executable="/bin/bash")
    out = (tmp_path / "texts-nfc.txt").read_text()
    assert out == "Query: Café<#sep#>Passage: crème\nbrûlée\n"


def test_export_readmes_and_limits(demo_qwen, checkpoints, models, tmp_path):
    path, model = demo_qwen
    out = ex.export(model, path, "retrieval", "text", tmp_path / "text")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32768
    readme = (out / "README.md").read_text()
    for command in (ex.LLAMA_CPP_PYTHON, ex.QUANTIZE, ex.LLAMA_EMBEDDING, ex.LLAMA_SERVER):
        assert command in readme
    assert ex.CONVERT in readme
    assert "--embd-separator" in ex.LLAMA_EMBEDDING and "--embedding" not in ex.LLAMA_EMBEDDING
    assert "--embedding" in ex.LLAMA_SERVER and "not SEP or EOS" in readme and "NFC" in readme
    assert (out / "tokenizer.json").read_bytes() == (Path(path) / "tokenizer.json").read_bytes()
    vllm = ex.export(models("gqa2-sharded"), checkpoints["gqa2-sharded"], "code", "vllm", tmp_path / "vllm")
    assert "max_model_len=32768" in (vllm / "README.md").read_text()


# A stand-in for llama.cpp's programs: `llama-embedding` prints what the real one prints (its JSON list with
# "%1.7f" components; with --verbose-prompt the token lines on stdout and the counts on stderr), `llama-server`
# serves /health, /v1/embeddings and /tokenize on 127.0.0.1. A token is a UTF-8 byte; a vector is fake_vector's.
FAKE = """
import json, os, sys, unicodedata
from pathlib import Path

def vector(text):
    b = text.encode("utf-8")
    v = [len(b), sum(b) % 97 + 1, 1.0, -0.5]
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]

args = sys.argv[1:]
Path("argv.json").write_text(json.dumps(args))
if os.path.basename(sys.argv[0]) == "llama-embedding":
    if "--embedding" in args:
        sys.exit("error: invalid argument: --embedding")
    prompt = Path(args[args.index("-f") + 1]).read_text(encoding="utf-8")
    prompt = prompt[:-1] if prompt.endswith("\\n") else prompt  # as llama.cpp's -f does
    texts = prompt.split(args[args.index("--embd-separator") + 1])
    if "--verbose-prompt" in args:
        for t in texts:
            print(f"main: number of tokens in prompt = {len(t.encode())}", file=sys.stderr)
            for i in t.encode():
                print("%6d -> '%s'" % (i, chr(i)))
            print("\\n")
    data = ",\\n".join(
        '    {\\n      "object": "embedding",\\n      "index": %d,\\n      "embedding": [%s]\\n    }'
        % (j, ",".join("%1.7f" % x for x in vector(t)))
        for j, t in enumerate(texts)
    )
    print('{\\n  "object": "list",\\n  "data": [\\n' + data + "\\n  ]\\n}\\n")
    print("llama_perf_context_print: load time = 1 ms", file=sys.stderr)
else:
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def reply(self, doc):
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply({"status": "ok"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                self.reply({"tokens": list(body["content"].encode())})
            else:
                data = [{"index": i, "embedding": vector(t)} for i, t in enumerate(body["input"])]
                self.reply({"object": "list", "data": data[::-1]})

        def log_message(self, *a):
            pass

    HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), H).serve_forever()
"""


def fake_vector(text):
    ns = {}
    exec(FAKE.split("args = sys.argv")[0], ns)
    return ns["vector"](text)


@pytest.fixture
def fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("llama-embedding", "llama-server"):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{FAKE}")
        (bin_dir / name).chmod(0o755)
    return bin_dir


PROGRAM_PROBES = [
    ("nfd", "Query: Cafe\u0301 <|im_end|>"),
    ("multi-line", "Passage: first\nsecond\n"),
    ("x", "Query: x"),
]


def program_check(bin_dir, tmp_path, programs, shift=0.0):
    """check_programs on a pretend f32 GGUF, jina_v4's side being what the README's rules give: NFC text, its
    UTF-8 bytes as ids, fake_vector (moved by `shift` in its first component)."""
    nfc = [unicodedata.normalize("NFC", p) for _, p in PROGRAM_PROBES]
    ours_ids = [list(t.encode()) for t in nfc]
    ours = [[x + shift * (i == 0) for i, x in enumerate(fake_vector(t))] for t in nfc]
    for name in {"llama-embedding", "llama-server"} - set(programs):
        (bin_dir / name).unlink(missing_ok=True)
    ggufs = [("f32 GGUF, f32 KV cache", tmp_path / "m f32.gguf", True)]
    return check_export.check_programs(bin_dir, ggufs, PROGRAM_PROBES, ours_ids, ours, tmp_path / "work")


def test_llama_embedding_runs_the_readme_command(fake_bin, tmp_path):
    variants, notes = program_check(fake_bin, tmp_path, ["llama-embedding"])
    assert notes == [f"llama-server: not found in {fake_bin}; its README.md command was not run"]
    [v] = variants
    assert v.name == "llama-embedding, f32 GGUF, f32 KV cache" and v.bounded
    assert [r.probe for r in v.rows] == ["nfd", "multi-line", "x"] and all(r.ids_equal for r in v.rows)
    assert all(r.max_abs <= 5e-8 and r.cosine == pytest.approx(1, abs=1e-7) for r in v.rows)  # "%1.7f" rounding
    assert check_export.verdict(variants, 1e-6) == []
    work = tmp_path / "work" / "llama-embedding-m f32"
    # the README's command as written: only the GGUF's name replaced (the second run adds --verbose-prompt)
    readme = shlex.split(
        ex.LLAMA_EMBEDDING.splitlines()[1].replace(ex.GGUF_NAME, shlex.quote(str(tmp_path / "m f32.gguf")))
    )
    assert json.loads((work / "argv.json").read_text()) == readme[1:] + ["--verbose-prompt"]
    nfc = "<#sep#>".join(unicodedata.normalize("NFC", p) for _, p in PROGRAM_PROBES) + "\n"
    assert (work / "texts-nfc.txt").read_text(encoding="utf-8") == nfc  # the NFC line ran before the program
    moved = program_check(fake_bin, tmp_path / "far", ["llama-embedding"], shift=2e-6)[0]
    bad = check_export.verdict(moved, 1e-6)  # 2e-6 off jina_v4's vector: every input fails the bound
    assert [b.split(" ")[0] for b in bad] == ["nfd", "multi-line", "x"] and all("e-06 > 1e-06" in b for b in bad)


def test_programs_not_found_are_skipped_and_a_refused_command_fails(fake_bin, tmp_path):
    variants, notes = check_export.check_programs(tmp_path / "none", [], PROGRAM_PROBES, [], [], tmp_path / "w")
    assert variants == [] and [n.split(":")[0] for n in notes] == ["llama-embedding", "llama-server"]
    assert all("not found in" in n for n in notes)
    fake = (fake_bin / "llama-embedding").read_text()
    (fake_bin / "llama-embedding").write_text(fake.replace('"--embedding" in args', "True"))
    with pytest.raises(check_export.Refused, match="llama-embedding command failed .exit 1.:\nerror: invalid argument"):
        program_check(fake_bin, tmp_path, ["llama-embedding"])
    with pytest.raises(check_export.Refused, match="no JSON list"):
        check_export.parse_embedding_json("main: error\n", 1)
    with pytest.raises(check_export.Refused, match="gave 1 embeddings for 2 texts"):
        check_export.parse_embedding_json('{\n  "object": "list", "data": [{"index": 0, "embedding": [1.0]}]}', 2)
    stderr = "number of tokens in prompt = 2\nnumber of tokens in prompt = 1\n"
    assert check_export.parse_verbose_ids("    10 -> '\n'\n   7 -> 'a'\n\n\n    9 -> 'b'\n\n\n", stderr, 2) == [
        [10, 7],
        [9],
    ]


@pytest.mark.slow
def test_llama_server_runs_the_readme_command(fake_bin, tmp_path):
    variants, notes = program_check(fake_bin, tmp_path, ["llama-server"])
    assert notes == [f"llama-embedding: not found in {fake_bin}; its README.md command was not run"]
    [v] = variants
    assert v.name == "llama-server, f32 GGUF, f32 KV cache" and all(r.ids_equal for r in v.rows)
    assert all(r.max_abs <= 1e-7 for r in v.rows)  # sorted by index (the stand-in answers in reverse)
    argv = json.loads((tmp_path / "work" / "llama-server-m f32" / "argv.json").read_text())
    port = argv[argv.index("--port") + 1]
    readme = shlex.split(ex.LLAMA_SERVER.replace(ex.GGUF_NAME, shlex.quote(str(tmp_path / "m f32.gguf"))))
    assert argv == readme[1:-1] + [port] and port != "8080"
    with pytest.raises(OSError):  # stopped afterwards
        socket.create_connection(("127.0.0.1", int(port)), timeout=5)
