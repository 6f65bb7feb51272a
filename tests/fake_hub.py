"""A local stand-in for the Hugging Face Hub HTTP API, enough for `HfApi.upload_folder`.

Implements what huggingface_hub 2.4.0 calls when uploading a folder without hf_xet
(HF_HUB_DISABLE_XET=1): repo creation, branch creation, the file tree, README metadata
validation, preupload (regular vs LFS), the LFS batch API with basic PUT upload and
verify, and the NDJSON commit endpoint (also as a pull request). Every request is
recorded with its Authorization header so tests can check the token was sent and used
only there; anything unknown answers 404 and is recorded as unhandled.
"""

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".h5", ".msgpack", ".gguf")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.model filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self, token):
        self.token = token
        self.repos = {}  # repo_id -> {"private", "refs": {name: sha}, "commits": {sha: {path: (bytes, is_lfs)}}, "prs": int}
        self.lfs = {}  # sha256 -> bytes
        self.requests = []  # (method, path, authorization header)
        self.unhandled = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status, payload=None, error_code=None):
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method):
                body = self._body() if method in ("POST", "PUT") else b""
                url = urlsplit(self.path)
                with hub.lock:
                    hub.requests.append((method, url.path, self.headers.get("Authorization")))
                if url.path == "/api/agent-harnesses":  # the client's user-agent registry, fetched without a token
                    return self._send(404, {"error": "not served here"})
                presigned = url.path.startswith("/lfs-upload/")  # like S3 presigned URLs: no token
                if not presigned and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials"})
                with hub.lock:
                    status, payload, code = hub.route(method, url.path, parse_qs(url.query), body, self)
                self._send(status, payload, code)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ state helpers
    def files(self, repo_id, revision="main"):
        """{path: bytes} at a revision (branch, PR ref or commit sha)."""
        repo = self.repos[repo_id]
        sha = repo["refs"].get(revision, revision)
        return {path: content for path, (content, _) in repo["commits"][sha].items()}

    def _new_repo(self, repo_id, private):
        sha = uuid.uuid4().hex + "00000000"
        self.repos[repo_id] = {"private": private, "refs": {"main": sha}, "prs": 0,
                               "commits": {sha: {".gitattributes": (GITATTRIBUTES, False)}}}

    def _resolve(self, repo_id, revision):
        """(repo, commit sha) or an error tuple."""
        if repo_id not in self.repos:
            return None, (404, {"error": "Repository not found"}, "RepoNotFound")
        repo = self.repos[repo_id]
        if revision in repo["refs"]:
            return repo, repo["refs"][revision]
        if revision in repo["commits"]:
            return repo, revision
        return None, (404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")

    # ------------------------------------------------------------------ routes
    def route(self, method, path, query, body, handler):
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, None
            self._new_repo(repo_id, request.get("visibility") == "private")
            return 200, {"url": f"{self.url}/{repo_id}"}, None
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if not match or not isinstance(yaml.safe_load(match.group(1)), dict):
                return 400, {"errors": [{"message": "no YAML metadata block"}]}, None
            return 200, {"errors": [], "warnings": []}, None
        match = re.match(r"^/api/models/([^/]+/[^/]+)/(tree|preupload|commit|branch|revision)/([^/]+)$", path)
        if match:
            repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3))
            return getattr(self, f"_{action}")(method, repo_id, revision, query, body)
        match = re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if match and method == "POST":
            return self._lfs_batch(match.group(1), json.loads(body))
        match = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
        if match and method == "PUT":
            oid = match.group(1)
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}, None
            self.lfs[oid] = body
            return 200, {}, None
        if method == "POST" and path == "/lfs-verify":
            request = json.loads(body)
            ok = request["oid"] in self.lfs and len(self.lfs[request["oid"]]) == request["size"]
            return (200, {}, None) if ok else (404, {"error": "object not found"}, None)
        self.unhandled.append((method, path))
        return 404, {"error": f"not implemented: {method} {path}"}, None

    def _tree(self, method, repo_id, revision, query, body):
        repo, sha = self._resolve(repo_id, revision)
        if repo is None:
            return sha
        entries = []
        for path, (content, is_lfs) in sorted(repo["commits"][sha].items()):
            entry = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
            if is_lfs:
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return 200, entries, None

    def _revision(self, method, repo_id, revision, query, body):
        repo, sha = self._resolve(repo_id, revision)
        if repo is None:
            return sha
        return 200, {"id": repo_id, "sha": sha, "private": repo["private"],
                     "siblings": [{"rfilename": path} for path in sorted(repo["commits"][sha])]}, None

    def _branch(self, method, repo_id, branch, query, body):
        repo, sha = self._resolve(repo_id, "main")
        if repo is None:
            return sha
        if branch in repo["refs"]:
            return 409, {"error": "Reference already exists"}, None
        repo["refs"][branch] = sha
        return 200, {}, None

    def _preupload(self, method, repo_id, revision, query, body):
        repo, sha = self._resolve(repo_id, revision)
        if repo is None:
            return sha
        current = repo["commits"][sha]
        files = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            is_lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > 10_000_000 or b"\0" in sample
            oid = None
            if item["path"] in current:
                content, remote_lfs = current[item["path"]]
                oid = hashlib.sha256(content).hexdigest() if remote_lfs else git_blob_sha1(content)
            files.append({"path": item["path"], "uploadMode": "lfs" if is_lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        return 200, {"files": files}, None

    def _lfs_batch(self, repo_id, request):
        if repo_id not in self.repos:
            return 404, {"message": "Repository not found"}, "RepoNotFound"
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}"},
                                    "verify": {"href": f"{self.url}/lfs-verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, None

    def _commit(self, method, repo_id, revision, query, body):
        repo, sha = self._resolve(repo_id, revision)
        if repo is None:
            return sha
        files = dict(repo["commits"][sha])
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]
        if header["key"] != "header" or not header["value"].get("summary"):
            return 400, {"error": "commit header with a summary expected first"}, None
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = (base64.b64decode(value["content"]), False)
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}, None
                files[value["path"]] = (self.lfs[value["oid"]], True)
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                return 400, {"error": f"unknown operation {line['key']}"}, None
        new_sha = hashlib.sha1(json.dumps(sorted((p, git_blob_sha1(c)) for p, (c, _) in files.items())).encode()
                               + uuid.uuid4().bytes).hexdigest()
        repo["commits"][new_sha] = files
        repo.setdefault("messages", {})[new_sha] = header["value"]
        pr_url = None
        if query.get("create_pr") == ["1"]:
            repo["prs"] += 1
            repo["refs"][f"refs/pr/{repo['prs']}"] = new_sha
            pr_url = f"{self.url}/{repo_id}/discussions/{repo['prs']}"
        else:
            repo["refs"][revision if revision in repo["refs"] else "main"] = new_sha
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{new_sha}", "commitOid": new_sha,
                     "pullRequestUrl": pr_url}, None
