"""``kvcomm-sglang serve --kvcomm-anchor-path DIR``: applications' templates and anchor pools
saved to DIR and loaded at the next start (docs/isolation.md, "Across restarts").

Files: per named application (``kvcomm:<application id>.<workflow id>``; an application of its
own is never saved) ``<sha256 of its id>.pt`` (``snapshot.snapshot``, CPU tensors) and
``<same>.json`` (the fingerprint it was saved under, its template keys). The id itself is never
written: a file is found again only by a request that names the application.

When: a changed application is saved when the server falls idle (the first scheduler step with
no request), at least every ``anchor_save_interval_s`` while busy, and when it is dropped from
the table (then kept pending, so it comes back warm when named again). The scheduler thread
only copies the state to host memory; a writer thread writes the files. SGLang stops its
scheduler with SIGKILL, so nothing runs at shutdown: what was learned after the last save is
lost with a crash or a stop under load.

Load: at start the fingerprints are checked: model (its config and a sample of every weight),
tokenizer files, KV layout, RoPE and storage frame. A file saved under another is refused with
an error line naming what differs, and its application starts cold (served densely until its
anchors warm up again): the server still starts, because the other applications and all plain
traffic are unaffected. A matching file is restored when the first request naming its
application arrives (the scheduler hook, before that request is matched), through the store's
budget and the application's quota; a template whose tokens do not hash to its key is refused.
At most ``max_applications`` files are kept (the oldest go).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvcomm_sglang import snapshot
from kvcomm_sglang.protocol import NAMESPACE_PREFIX, split_namespace
from kvcomm_sglang.runtime_patch.segment_store import StoreFull

logger = logging.getLogger(__name__)
PATH_ENV = "KVCOMM_ANCHOR_PATH"
FINGERPRINT_FIELDS = ("model", "tokenizer", "kv", "rope", "storage")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mismatch(saved, current: dict) -> list[str]:
    """What differs between a file's fingerprint and this server's, one phrase each."""
    if not isinstance(saved, dict):
        return ["no fingerprint"]
    return [f"{name} {str(saved.get(name))[:16]} (saved) != {str(current[name])[:16]} (served)"
            for name in FINGERPRINT_FIELDS if saved.get(name) != current[name]]


class AnchorPersistence:
    def __init__(self, path, fingerprint: dict, config):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.config = fingerprint, config
        self.pending: dict[str, pathlib.Path] = {}     # sha256(application id) -> tensor file
        self.refused: dict[str, str] = {}              # meta file name -> why
        self.saved_versions: dict[str, int] = {}       # application id -> version saved
        self.writes: dict[str, Future] = {}            # sha256(application id) -> write in flight
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="kvcomm-anchor-save")
        self.last_save = time.monotonic()
        self._scan()

    def _scan(self) -> None:
        for meta in sorted(self.path.glob("*.json")):
            try:
                info = json.loads(meta.read_text())
                problems = mismatch(info.get("fingerprint"), self.fingerprint)
                app = info["application"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problems, app = [f"unreadable: {type(exc).__name__}"], None
            if problems:
                self.refused[meta.name] = "; ".join(problems)
                logger.error("kvcomm: saved application %s refused: it was saved under another "
                             "%s; it starts cold (served densely until its anchors warm up "
                             "again)", meta.name, self.refused[meta.name])
            else:
                self.pending[app] = meta.with_suffix(".pt")
        logger.info("kvcomm: %d saved applications in %s, %d refused", len(self.pending),
                    self.path, len(self.refused))

    # ---- restore ----
    def restore_named(self, runtime, reqs) -> None:
        """Restore the saved applications that ``reqs`` name (before they are matched)."""
        if not self.pending:
            return
        for req in reqs:
            extra = getattr(req, "extra_key", None)
            if not (isinstance(extra, str) and extra.startswith(NAMESPACE_PREFIX)):
                continue
            application, workflow = split_namespace(extra)
            if application != workflow and digest(application) in self.pending:
                app = runtime.applications.get(application, implicit=False)
                if app is not None:
                    self.restore(runtime, app)

    def restore(self, runtime, app) -> None:
        path = self.pending.pop(digest(app.key), None)
        if path is None:
            return
        write = self.writes.get(digest(app.key))
        if write is not None:
            write.exception()                         # parked moments ago: its file first
        try:
            data = torch.load(path, weights_only=True)
            with runtime.store.building(app.owner):
                refused = snapshot.restore(app.state, data)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, StoreFull) as exc:
            refused = [f"{type(exc).__name__}: {exc}"]
        app.version += 1
        runtime.sweep(app)
        self.saved_versions[app.key] = app.version
        for line in refused:
            logger.error("kvcomm: saved application %s: refused %s", path.name, line)
        logger.info("kvcomm: restored application %s: %d templates, %d anchors", path.name,
                    len(app.state.templates), app.state.anchors.num_anchors)

    # ---- save ----
    def after_batch(self, runtime, live_reqs) -> None:
        """The scheduler hook: restore what new requests name; save changed applications when
        idle, or every ``anchor_save_interval_s``."""
        self.restore_named(runtime, live_reqs)
        due = time.monotonic() - self.last_save >= self.config.anchor_save_interval_s
        if live_reqs and not due:
            return
        for app in runtime.applications.values():
            if self.saved_versions.get(app.key) != app.version:
                self.save(app)
        self.last_save = time.monotonic()

    def save(self, app) -> bool:
        """Copy ``app``'s state to host memory here (the scheduler thread: the store's blocks
        may be freed after this call) and write its files on a writer thread, so the scheduler
        does not wait for the disk; files are replaced atomically (a crash leaves the previous
        ones). -> False when nothing was saved: an application of its own, a file not restored
        yet, or a failed copy (logged; a failed write is logged by the writer). The server keeps
        serving either way."""
        name = digest(app.key)
        if app.implicit or name in self.pending:      # a file not restored yet stays as it is
            return False
        try:
            data = snapshot.snapshot(app.state)
        except Exception:                             # noqa: BLE001 (never into the scheduler)
            logger.exception("kvcomm: could not save application %s", name)
            return False
        meta = {"fingerprint": self.fingerprint, "application": name,
                "templates": sorted(app.state.templates), "saved_at": time.time(),
                "anchors": app.state.anchors.num_anchors}
        write = self.writes[name] = self.writer.submit(self._write, name, data, meta)
        write.add_done_callback(lambda done: self._written(name, done))
        self.saved_versions[app.key] = app.version
        return True

    def park(self, app) -> None:
        """Save an application that is being dropped and keep its file pending, so it is
        restored when a request names it again (not started cold and saved over)."""
        if self.save(app):
            name = digest(app.key)
            self.pending[name] = self.path / f"{name}.pt"

    def _written(self, name: str, write: Future) -> None:
        """A finished write is nobody's to wait for: only writes in flight stay in ``writes``
        (one per application ever saved would grow without bound)."""
        if self.writes.get(name) is write:
            del self.writes[name]

    def flush(self) -> None:
        """Wait for every write in flight (restores and tests read what was written)."""
        for future in list(self.writes.values()):
            future.exception()

    def _write(self, name: str, data: dict, meta: dict) -> None:
        try:
            for suffix, write in ((".pt", lambda f: torch.save(data, f)),
                                  (".json", lambda f: f.write(json.dumps(meta).encode()))):
                tmp = self.path / f".{name}{suffix}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        write(f)
                    os.replace(tmp, self.path / f"{name}{suffix}")
                finally:
                    tmp.unlink(missing_ok=True)
            self._bound()
        except Exception:                             # noqa: BLE001 (disk full, permissions)
            logger.exception("kvcomm: could not save application %s", name)

    def _bound(self) -> None:
        metas = sorted(self.path.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for meta in metas[:max(0, len(metas) - self.config.max_applications)]:
            for path in (meta, meta.with_suffix(".pt")):
                path.unlink(missing_ok=True)


def fingerprint(model, hf_config, tokenizer_path, pool, rope, config) -> dict:
    """What saved anchors depend on: the weights (config and a sample of every parameter), the
    tokenizer's files, the KV layout, the RoPE and the storage frame."""
    h = hashlib.sha256(json.dumps(hf_config.to_dict(), sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        sample = param.detach().reshape(-1)[:64].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode() + sample)
    k0 = pool.k_buffer[0]
    rope_text = (f"{rope.head_dim}:{rope.rotary_dim}:{rope.kind}:{rope.is_neox}:{rope.mscale}:"
                 + ",".join(f"{f:.9g}" for f in rope.inv_freq))
    return {"model": h.hexdigest(), "tokenizer": _tokenizer_digest(tokenizer_path),
            "kv": f"{len(pool.k_buffer)}x{k0.shape[1]}x{k0.shape[2]}:{k0.dtype}",
            "rope": digest(rope_text),
            "storage": "derotated" if config.derotated_storage else "absolute"}


def _tokenizer_digest(path) -> str:
    folder = pathlib.Path(str(path))
    if not folder.is_dir():
        return digest(str(path))
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                     "merges", "added_tokens", "chat_template"))):
            h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()
