"""Where pretrained weights come from: ``--pretrained hub | hf-hub:ORG/NAME | timm/NAME.TAG | FILE | none``.

``hub`` is the architecture's default pretrained tag as timm names it (``efficientnet_b3`` ->
``timm/efficientnet_b3.ra2_in1k``); a repo id is any Hugging Face repo in timm's layout. Both
go through the Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``) and ``huggingface_hub``,
which downloads to a temporary name, checks the size against the server's and renames it, so
a broken transfer never becomes a cache entry; on top of that the file's sha256 is checked
against the server's (the etag of a hub LFS file is its sha256). ``HF_HUB_OFFLINE=1`` reads
the cache only. Every failure is one :class:`MaskdistError` line that names the fix.

What is resolved is a local file, which :func:`maskdist.model.factory.create_model` loads
(safetensors, or ``torch.load(weights_only=True)``); :attr:`Weights.record` is what the
model card keeps of it (repo id and resolved revision, or the file's sha256).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from maskdist.errors import MaskdistError
from maskdist.model import architectures
from maskdist.system import network
from maskdist.system.fileio import atomic_path, sha256_file

HUB = "hub"
NONE = "none"
HF_PREFIX = "hf-hub:"
# In a repo of timm's layout: the weights (safetensors first: loading it runs no code).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FILE_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class Weights:
    """A resolved source: ``path`` None for random weights; ``record`` for the model card."""

    path: Path | None
    record: dict = field(default_factory=dict)


def is_none(spec: str) -> bool:
    return spec.strip().lower() in ("", NONE)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as it is now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def cache_dir() -> str | None:
    """The hub cache as the environment says now; None: huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_repo(architecture: str) -> str:
    """The repo of ``architecture``'s default pretrained tag (or of ``arch.tag``)."""
    from timm.models import get_pretrained_cfg

    architectures.check(architecture)
    cfg = get_pretrained_cfg(architecture)
    if cfg is None or not cfg.hf_hub_id:
        raise MaskdistError(f"timm has no hub weights for {architecture!r}: pass --pretrained FILE, a hf-hub:ORG/NAME repo, or none")
    return cfg.hf_hub_id


def repo_of(spec: str, architecture: str) -> str | None:
    """The hub repo ``spec`` names (``hub``: ``architecture``'s default tag), or None for a file."""
    spec = spec.strip()
    if spec == HUB:
        return hub_repo(architecture)
    if spec.startswith(HF_PREFIX):
        return spec[len(HF_PREFIX):]
    if "/" in spec and not Path(spec).exists() and not spec.endswith(FILE_SUFFIXES) and spec.count("/") == 1 and not spec.startswith("."):
        return spec  # ORG/NAME, e.g. timm/efficientnet_b3.ra2_in1k
    return None


def local_file(spec: str, architecture: str) -> Path | None:
    """The local weights file ``spec`` names, or None when it names none or a hub repo;
    MaskdistError when that file is missing (checked before torch loads: maskdist.cli.usage)."""
    if is_none(spec) or repo_of(spec, architecture) is not None:
        return None
    path = Path(spec)
    if not path.is_file():
        raise MaskdistError(f"pretrained weights {path} not found: pass a local .safetensors/.pth file of {architecture},"
                            f" --pretrained {HUB} (timm's default weights through the Hugging Face cache), or {NONE}")
    return path


def resolve(spec: str, architecture: str, local_only: bool = False, verify: bool = True) -> Weights:
    """The weights ``spec`` names for ``architecture``, downloaded into the cache if need be
    (never with ``local_only`` or ``HF_HUB_OFFLINE=1``); ``verify``: check a cached file's
    sha256 (once per node is enough: the other processes of a node skip it)."""
    if is_none(spec):
        return Weights(None, {"source": NONE})
    path = local_file(spec, architecture)
    if path is not None:
        return Weights(path, {"source": "file", "file": str(path), "sha256": sha256_file(path)})
    repo = repo_of(spec, architecture)
    path = download(repo, architecture, local_only=local_only or offline(), verify=verify)
    revision = path.parent.name if path.parent.parent.name == "snapshots" else ""
    return Weights(path, {"source": "hf-hub", "repo_id": repo, "revision": revision, "file": path.name})


def download(repo: str, architecture: str, local_only: bool = False, verify: bool = True) -> Path:
    """The cached weights file of ``repo`` (downloaded unless ``local_only``), checked."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    no_network = None
    if not local_only:
        no_network = network.unreachable(_endpoint() or huggingface_hub.constants.ENDPOINT)
        local_only = no_network is not None  # the cache may still have them; the hub cannot, so nothing is retried
    last = len(WEIGHT_FILES) - 1
    for i, filename in enumerate(WEIGHT_FILES):
        try:
            path = Path(huggingface_hub.hf_hub_download(repo, filename, cache_dir=cache_dir(), endpoint=_endpoint(),
                                                        local_files_only=local_only))
        except hub_errors.RemoteEntryNotFoundError:
            if i == last:
                raise MaskdistError(f"hub repo {repo} has none of {', '.join(WEIGHT_FILES)}: is it a timm model?") from None
            continue
        except hub_errors.LocalEntryNotFoundError:
            if i < last and _cached(repo, WEIGHT_FILES[last]):
                continue
            raise MaskdistError(f"weights of {architecture} ({repo}) are not in the Hugging Face cache and"
                                f" {_why_cache_only(no_network)}: {_offline_advice(architecture)}") from None
        except hub_errors.RepositoryNotFoundError:
            raise MaskdistError(f"hub repo {repo} not found (or private without a token): check the name,"
                                f" or pass --pretrained FILE") from None
        except hub_errors.RevisionNotFoundError as err:
            raise MaskdistError(f"hub repo {repo}: {_first_line(err)}") from None
        except (OSError, hub_errors.HfHubHTTPError, *_http_errors()) as err:
            raise MaskdistError(f"download of {repo}/{filename} failed ({_first_line(err)}); nothing was kept in the cache:"
                                f" run again, or {_offline_advice(architecture)}") from None
        if verify:
            check_blob(path, repo)
        return path
    raise AssertionError("unreachable")


def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir()), str)


def check_blob(path: Path, repo: str) -> None:
    """A cached file whose blob is named by a sha256 (a hub LFS file) must have that sha256;
    one that does not is removed (link and blob) so the next attempt downloads it again."""
    blob = path.resolve()
    expected = blob.name
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        return  # a small file kept in git: its etag is a git hash, the size check is all there is
    if sha256_file(blob) != expected:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise MaskdistError(f"the download of {repo}/{path.name} was corrupt (its sha256 is not the hub's): it was removed"
                            f" from the cache; run again")


def _why_cache_only(no_network: str | None) -> str:
    if no_network:
        return f"the hub cannot be reached ({no_network}; nothing was retried)"
    return "the hub is offline (HF_HUB_OFFLINE=1)" if offline() else "this process only reads the cache"


def _offline_advice(architecture: str) -> str:
    """What works from a node without network: fill the cache, or carry a file, from one with it."""
    return (f"on a machine with network run `maskdist weights fetch {architecture}` with the same HF_HOME (a shared"
            f" filesystem), or `maskdist weights fetch {architecture} --out {architecture}.safetensors` and bring the file"
            f" here for `--pretrained {architecture}.safetensors`")


def _http_errors() -> tuple[type, ...]:
    """The HTTP client's errors: huggingface_hub 2.x uses httpx2, 1.x httpx (both may be absent)."""
    import importlib

    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except ImportError:
            continue
    return tuple(found)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def fetch(spec: str, out: Path | None = None) -> Weights:
    """``maskdist weights fetch``: fill the cache with ``spec``'s weights (an architecture,
    ``arch.tag``, or a repo id), and copy them to ``out`` (atomically) when given."""
    spec = spec.strip()
    repo = repo_of(spec, spec) or hub_repo(spec)
    weights = resolve(HF_PREFIX + repo, spec)
    if out is not None:
        out = Path(out)
        if out.suffix != weights.path.suffix:
            raise MaskdistError(f"--out {out}: the weights are a {weights.path.suffix} file; name it so"
                                f" (e.g. {out.with_suffix(weights.path.suffix)})")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            shutil.copyfile(weights.path, tmp)
    return weights


@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    size_bytes: int
    revisions: list[str]  # commit hashes, with the refs that point at them: "abc123 (main)"
    path: Path


def cached() -> list[CachedRepo]:
    """``maskdist weights list``: the model repos of the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = [rev.commit_hash[:12] + (f" ({', '.join(sorted(rev.refs))})" if rev.refs else "")
                     for rev in sorted(repo.revisions, key=lambda r: r.commit_hash)]
        rows.append(CachedRepo(repo.repo_id, repo.size_on_disk, revisions, repo.repo_path))
    return rows
