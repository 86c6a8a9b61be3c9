"""`--model ORG/NAME`: downloads from a Hub (a local fake one, on 127.0.0.1) into the Hugging Face cache, only the
files polylm reads; cached or offline means no request at all; gated, private and missing repos give one line."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest

import polylm
from polylm.checkpoint.download import ALLOW_PATTERNS
from polylm.cli import EXIT_USER_ERROR, main
from polylm.errors import HubError

DECOYS = {"pytorch_model.bin": b"not a pickle polylm would ever open", "README.md": b"# tiny\n",
          "onnx/model.onnx": b"onnx"}
PROMPT = [1, 5, 9]


class FakeHub:
    """Answers the Hub API calls `snapshot_download` makes: the revision info, the recursive tree listing, and
    HEAD/GET on resolve/<revision>/<file> with the ETag, X-Repo-Commit and size headers it requires."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, repo: str, files: dict[str, bytes], ref: str = "main", access: str = "public") -> str:
        commit = hashlib.sha1(repr(sorted(files.items())).encode() + ref.encode()).hexdigest()
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}, "access": access})
        entry["refs"][ref] = commit
        entry["commits"][commit] = files
        return commit

    def handle(self, method: str, raw_path: str) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.requests.append((method, raw_path))
        parts = [unquote(p) for p in urlsplit(raw_path).path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        repo, rest = "/".join(parts[:2]), parts[2:]
        entry = self.repos.get(repo)
        if entry is None:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"{}"
        if entry["access"] == "private":  # what the Hub answers without a token, for a private repo
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid username or password."}, b"{}"
        if entry["access"] == "gated":
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."}, b"{}"
        revision = rest[1] if len(rest) > 1 else "main"
        commit = entry["refs"].get(revision, revision)
        files = entry["commits"].get(commit)
        if files is None:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"{}"
        if api and rest[0] == "revision":
            body = {"id": repo, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
            return 200, {}, json.dumps(body).encode()
        if api and rest[0] == "tree":
            body = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return 200, {}, json.dumps(body).encode()
        if not api and rest[0] == "resolve":
            name = "/".join(rest[2:])
            if name not in files:
                return 404, {"X-Error-Code": "EntryNotFound"}, b""
            data = files[name]
            return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data
        return 400, {}, b""

    def downloaded(self) -> set[str]:
        return {urlsplit(p).path.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.requests
                if m == "GET" and "/resolve/" in p}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def answer(self, send_body: bool) -> None:
            status, headers, body = fake.handle(self.command, self.path)
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.answer(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self.answer(False)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN", "")  # no token of this machine reaches the fake hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield fake
    server.shutdown()
    server.server_close()


def repo_files(directory) -> dict[str, bytes]:
    return {**{p.name: p.read_bytes() for p in sorted(directory.iterdir())}, **DECOYS}


@pytest.fixture
def sharded(make_ckpt):
    return make_ckpt("helium", shard_size="60KB")


def test_first_run_downloads_only_model_files_and_loads_the_same_model(hub, sharded, tmp_path):
    commit = hub.add("acme/tiny", repo_files(sharded))
    model = polylm.load("acme/tiny", backend="torch")
    assert model.path == tmp_path / "hf-cache" / "models--acme--tiny" / "snapshots" / commit
    wanted = {p.name for p in sharded.iterdir()}
    assert "model.safetensors.index.json" in wanted and len([w for w in wanted if w.endswith(".safetensors")]) > 1
    assert hub.downloaded() == wanted  # never the decoys
    assert {p.name for p in model.path.iterdir()} == wanted
    reference = polylm.load(sharded, backend="torch")
    assert model.generate(PROMPT, max_new_tokens=6) == reference.generate(PROMPT, max_new_tokens=6)


def test_allow_patterns_keep_what_polylm_reads():
    from huggingface_hub.utils import filter_repo_objects

    names = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer.model", "chat_template.jinja", *DECOYS, "model.gguf", "flax_model.msgpack"]
    assert set(filter_repo_objects(names, allow_patterns=ALLOW_PATTERNS)) == set(names[:6])


def test_second_run_and_offline_make_no_request(hub, sharded, monkeypatch, capsys):
    hub.add("acme/tiny", repo_files(sharded))
    assert main(["run", "--model", "acme/tiny", "--backend", "torch", "--max-new-tokens", "4", "hi"]) == 0
    first = capsys.readouterr().out
    assert hub.requests
    hub.requests.clear()
    assert main(["run", "--model", "acme/tiny", "--backend", "torch", "--max-new-tokens", "4", "hi"]) == 0
    assert capsys.readouterr().out == first
    assert hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "--model", "acme/tiny", "--backend", "torch", "--max-new-tokens", "4", "hi"]) == 0
    assert main(["run", "--model", "acme/other", "hi"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "acme/other" in err and "HF_HUB_OFFLINE" in err and len(err.splitlines()) == 1
    assert hub.requests == []


def test_an_interrupted_download_is_completed(hub, sharded):
    hub.add("acme/tiny", repo_files(sharded))
    snapshot = polylm.load("acme/tiny", backend="torch").path
    shard = next(snapshot.glob("model-*.safetensors"))
    blob = shard.resolve()
    shard.unlink()  # as a download stopped before this shard was complete leaves the snapshot
    blob.unlink()
    hub.requests.clear()
    assert polylm.load("acme/tiny", backend="torch").path == snapshot
    assert hub.downloaded() == {shard.name}


def test_revision_picks_its_snapshot(hub, make_ckpt, capsys):
    main_dir, v2_dir = make_ckpt("helium", seed=0), make_ckpt("helium", seed=1)
    hub.add("acme/tiny", repo_files(main_dir))
    v2 = hub.add("acme/tiny", repo_files(v2_dir), ref="v2")
    expected = {d: polylm.load(d, backend="torch").generate(PROMPT, max_new_tokens=6) for d in (main_dir, v2_dir)}
    assert expected[main_dir] != expected[v2_dir]
    assert polylm.load("acme/tiny", backend="torch").generate(PROMPT, max_new_tokens=6) == expected[main_dir]
    for spec, revision in (("acme/tiny", "v2"), ("acme/tiny@v2", None), ("acme/tiny", v2)):
        model = polylm.load(spec, backend="torch", revision=revision)
        assert model.path.name == v2
        assert model.generate(PROMPT, max_new_tokens=6) == expected[v2_dir]
    args = ["--backend", "torch", "--max-new-tokens", "4", "hi"]
    assert main(["run", "--model", "acme/tiny", "--revision", "v2", *args]) == 0
    v2_text = capsys.readouterr().out
    assert main(["run", "--model", "acme/tiny", *args]) == 0
    assert capsys.readouterr().out != v2_text
    assert main(["run", "--model", "acme/tiny@main", "--revision", "v2", *args]) == EXIT_USER_ERROR
    assert main(["run", "--model", "acme/tiny", "--revision", "nope", *args]) == EXIT_USER_ERROR
    assert main(["run", "--model", "acme/tiny", "--revision", "../../x", *args]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "give one" in err and "no revision 'nope'" in err and "acme/tiny" in err and "is not a revision" in err


@pytest.mark.parametrize("access, expected", [
    ("gated", ["is gated", "hf auth login", "HF_TOKEN"]),
    ("private", ["does not exist or is private", "hf auth login", "HF_TOKEN"]),
    ("missing", ["does not exist", "check the name"]),
])
def test_refused_repos_give_one_line(hub, sharded, capsys, access, expected):
    if access != "missing":
        hub.add("acme/closed", repo_files(sharded), access=access)
    with pytest.raises(HubError, match="acme/closed"):
        polylm.load("acme/closed")
    for command in (["run", "--model", "acme/closed", "hi"], ["classify", "--model", "acme/closed", "x"],
                    ["bench", "--model", "acme/closed"]):
        assert main(command) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "'acme/closed'" in err and all(e in err for e in expected), err
    assert hub.downloaded() == set()


def test_an_unreachable_hub_gives_one_line(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert main(["run", "--model", "acme/tiny", "hi"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "could not be reached" in err and "acme/tiny" in err


@pytest.mark.parametrize("spec", ["./acme/tiny", "/acme/tiny", "~/acme/tiny", "acme/tiny/more", "acme/../tiny",
                                  "acme--x/tiny", "tiny"])
def test_paths_that_are_no_repo_id_never_reach_the_network(hub, sharded, spec):
    hub.add("acme/tiny", repo_files(sharded))
    with pytest.raises(polylm.errors.ConfigError, match="model directory not found"):
        polylm.load(spec)
    assert hub.requests == []


def test_revision_of_a_local_directory_is_refused(sharded, capsys):
    assert main(["run", "--model", str(sharded), "--revision", "v2", "hi"]) == EXIT_USER_ERROR
    assert "drop --revision" in capsys.readouterr().err
