"""Official RWKV-7 models by name: where each lives on the Hugging Face hub, and fetching it.

`KNOWN_MODELS` maps a short name (`rwkv7-g1a3-1.5b`) to a repository, a file and the
tokenizer it needs, as published on the hub's model pages. Where the hub's pages publish a
file's sha256 (its LFS object id) and size, the table records them and pins the revision
that added the file, so a name always means the same bytes.

`fetch()` downloads through `huggingface_hub` (its cache, `HF_HOME`/`HF_HUB_CACHE`,
`HF_ENDPOINT`, `HF_HUB_OFFLINE`, progress bar, resumption of a dropped transfer) and then
checks the file against what the hub says: the size, and the sha256 (the table's value, else
the hub's LFS etag, which is the sha256 of the content). A file that fails is removed from
the cache so that the next attempt downloads it again. Every failure is a one-line
ModelHubError.

The environment is read at call time, not at import, so one process can switch hubs.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RwkvStateError, first_line

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = {"1", "on", "yes", "true"}
_HASH_CHUNK = 8 << 20


class ModelHubError(RwkvStateError):
    """A model name is unknown, or its file cannot be fetched or fails verification."""


@dataclass(frozen=True)
class HubModel:
    """One official checkpoint on the hub."""

    name: str
    repo: str
    filename: str
    tokenizer: str = "world"
    about: str = ""
    revision: str = "main"  # a commit id where the table pins the file, else a branch
    sha256: str | None = None  # published LFS object id, when the hub's pages show it
    size: int | None = None  # published size in bytes, when known

    @property
    def stem(self) -> str:
        return self.filename.rsplit(".", 1)[0]


_G1 = "BlinkDL/rwkv7-g1"
_WORLD = "BlinkDL/rwkv-7-world"

# Pile models (BlinkDL/rwkv-7-pile) are left out: they use the GPT-NeoX tokenizer, which
# rwkvstate does not implement. Names run oldest to newest within a family.
KNOWN_MODELS: dict[str, HubModel] = {m.name: m for m in (
    HubModel("rwkv7-g1-0.1b", _G1, "rwkv7-g1-0.1b-20250307-ctx4096.pth", about="G1 0.1B chat/reasoning",
             revision="6e6a3145651bab205047905e811cac7884f1ce01",
             sha256="854230983f1015407c44274a7a27196ed72007618995b7a7efba3c4a15f69a45"),
    HubModel("rwkv7-g1-0.4b", _G1, "rwkv7-g1-0.4b-20250324-ctx4096.pth", about="G1 0.4B chat/reasoning"),
    HubModel("rwkv7-g1-1.5b", _G1, "rwkv7-g1-1.5b-20250429-ctx4096.pth", about="G1 1.5B chat/reasoning"),
    HubModel("rwkv7-g1-2.9b", _G1, "rwkv7-g1-2.9b-20250519-ctx4096.pth", about="G1 2.9B chat/reasoning"),
    HubModel("rwkv7-g1a-0.1b", _G1, "rwkv7-g1a-0.1b-20250728-ctx4096.pth", about="G1a 0.1B chat/reasoning"),
    HubModel("rwkv7-g1a-0.4b", _G1, "rwkv7-g1a-0.4b-20250905-ctx4096.pth", about="G1a 0.4B chat/reasoning"),
    HubModel("rwkv7-g1a-2.9b", _G1, "rwkv7-g1a-2.9b-20250924-ctx4096.pth", about="G1a 2.9B chat/reasoning",
             revision="a07c6385ff76e5e5752d8b30b93b011df9ee5515",
             sha256="df5716263b617e7da83590446fb2a98b6663447cfd52e8e9b49e11ce7f4faa3e", size=5896274949),
    HubModel("rwkv7-g1a3-1.5b", _G1, "rwkv7-g1a3-1.5b-20251015-ctx8192.pth", about="G1a3 1.5B chat/reasoning",
             revision="71df75d4c929166e220998f32bdf3139e54c36b8",
             sha256="10bf909822e5899a55318996447cf9c935da078c9735a9e6b8afc9a0aa7f89e0", size=3055445757),
    HubModel("rwkv7-g1c-1.5b", _G1, "rwkv7-g1c-1.5b-20260110-ctx8192.pth", about="G1c 1.5B chat/reasoning"),
    HubModel("rwkv7-g1d-0.1b", _G1, "rwkv7-g1d-0.1b-20260129-ctx8192.pth", about="G1d 0.1B chat/reasoning"),
    HubModel("rwkv7-g1d-0.4b", _G1, "rwkv7-g1d-0.4b-20260210-ctx8192.pth", about="G1d 0.4B chat/reasoning"),
    HubModel("rwkv7-g1d-1.5b", _G1, "rwkv7-g1d-1.5b-20260212-ctx8192.pth", about="G1d 1.5B chat/reasoning"),
    HubModel("rwkv7-g0-7.2b", _G1, "rwkv7-g0-7.2b-20250722-ctx4096.pth", about="G0 7.2B pretrained base"),
    HubModel("rwkv7-g0a-7.2b", _G1, "rwkv7-g0a-7.2b-20250829-ctx4096.pth", about="G0a 7.2B pretrained base"),
    HubModel("rwkv7-g0a3-7.2b", _G1, "rwkv7-g0a3-7.2b-20251029-ctx8192.pth", about="G0a3 7.2B pretrained base",
             revision="394973e1bb5610c62dc80e172a328228baf4242f",
             sha256="a3b13d4f24eb1585647982d59c5a85088342c8ba7248237639d4a0102e05f34b", size=14400009405),
    HubModel("rwkv7-world-0.1b", _WORLD, "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", about="World 0.1B base",
             revision="b9edcafa66561b3004c9398f00a0007cd15edb0e",
             sha256="60c98129b9529963bff2c164b8ab4bd17c19332ae06dc2dcae32aa3a3739295a"),
    HubModel("rwkv7-world-0.4b", _WORLD, "RWKV-x070-World-0.4B-v2.9-20250107-ctx4096.pth", about="World 0.4B base"),
    HubModel("rwkv7-world-1.5b", _WORLD, "RWKV-x070-World-1.5B-v3-20250127-ctx4096.pth", about="World 1.5B base"),
    HubModel("rwkv7-world-2.9b", _WORLD, "RWKV-x070-World-2.9B-v3-20250211-ctx4096.pth", about="World 2.9B base"),
)}  # fmt: skip


# ---- names ----------------------------------------------------------------------------------


def _aliases() -> dict[str, HubModel]:
    """Lower-case name, file name and file stem -> entry."""
    table = {}
    for m in KNOWN_MODELS.values():
        for key in (m.name, m.filename, m.stem):
            table[key.lower()] = m
    return table


def lookup(name: str) -> HubModel | None:
    """The entry for a name, file name or file stem (any case), or None."""
    return _aliases().get(name.strip().lower())


def resolve(name: str) -> HubModel:
    """The entry for `name`; ModelHubError naming close matches if there is none."""
    model = lookup(name)
    if model is not None:
        return model
    close = difflib.get_close_matches(name.strip().lower(), list(KNOWN_MODELS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelHubError(f"unknown model name {name!r}{hint} (`rwkvstate models` lists the known names)")


# ---- the environment, read at call time --------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def cache_dir() -> Path:
    """huggingface_hub's cache: HF_HUB_CACHE, else HF_HOME/hub, else its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ---- the cache ---------------------------------------------------------------------------------


def cached_file(model: HubModel) -> Path | None:
    """The cached file for this entry's revision, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model.repo, model.filename, cache_dir=str(cache_dir()), revision=model.revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _quick_check(model: HubModel, path: Path) -> None:
    """Cheap checks of a cached file (no hashing): the published size, and the blob's name,
    which huggingface_hub sets to the hub's etag (the sha256, for an LFS file)."""
    size = path.stat().st_size
    if model.size is not None and size != model.size:
        raise ModelHubError(f"cached {model.filename} has {size:,} bytes, the hub published {model.size:,}: "
                            f"run `rwkvstate pull {model.name}` to fetch it again")  # fmt: skip
    blob = Path(os.path.realpath(path)).name
    if model.sha256 is not None and _SHA256.match(blob) and blob != model.sha256:
        raise ModelHubError(f"cached {model.filename} is not the published file (sha256 {blob[:12]}..., "
                            f"expected {model.sha256[:12]}...): run `rwkvstate pull {model.name}`")  # fmt: skip


# ---- fetching and verifying ----------------------------------------------------------------------


def sha256_of(path: Path, progress: bool = False) -> str:
    """sha256 of a file, read in chunks (with a progress bar on request)."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"sha256 {path.name[-40:]}", leave=False)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return digest.hexdigest()


def remote_metadata(model: HubModel):
    """What the hub says about the file (etag, size, commit) from one HEAD request."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(model.repo, model.filename, revision=model.revision, endpoint=endpoint())
    try:
        return get_hf_file_metadata(url, endpoint=endpoint())
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise _hub_error(model, e) from e


def expected_digest(model: HubModel, etag: str | None) -> str | None:
    """The sha256 the file must have: the table's, else the hub's LFS etag; a conflict is an error."""
    etag = (etag or "").strip('"').lower() or None
    if model.sha256 is not None:
        if etag is not None and _SHA256.match(etag) and etag != model.sha256:
            raise ModelHubError(f"the hub now serves a different {model.filename} (sha256 {etag[:12]}..., "
                                f"published {model.sha256[:12]}...); refusing it")  # fmt: skip
        return model.sha256
    return etag if etag is not None and _SHA256.match(etag) else None


def verify(model: HubModel, path: Path, *, size: int | None, sha256: str | None, progress: bool = False) -> str:
    """Checks size and sha256 of a downloaded file; removes it from the cache if either fails.

    Returns the file's sha256."""
    actual_size = path.stat().st_size
    expected_size = model.size if model.size is not None else size
    if expected_size is not None and actual_size != expected_size:
        _evict(path)
        raise ModelHubError(f"{model.filename}: downloaded {actual_size:,} bytes, the hub says {expected_size:,}; "
                            f"the partial file was removed, run `rwkvstate pull {model.name}` again")  # fmt: skip
    digest = sha256_of(path, progress=progress)
    if sha256 is not None and digest != sha256:
        _evict(path)
        raise ModelHubError(f"{model.filename}: sha256 mismatch (got {digest[:16]}..., expected "
                            f"{sha256[:16]}...); the file was removed from the cache, run "
                            f"`rwkvstate pull {model.name}` again")  # fmt: skip
    return digest


def _evict(path: Path) -> None:
    """Removes a cached file: its blob and the snapshot link to it."""
    blob = Path(os.path.realpath(path))
    for p in {path, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def download(model: HubModel, progress: bool = True) -> Path:
    """Downloads (or finds in the cache) the file through huggingface_hub; returns its path."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(
            model.repo, model.filename, revision=model.revision, cache_dir=str(cache_dir()),
            endpoint=endpoint(), local_files_only=is_offline(), tqdm_class=None if progress else _quiet_tqdm(),
        ))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise _hub_error(model, e) from e


@dataclass
class Fetched:
    """What fetch() found or downloaded."""

    model: HubModel
    path: Path
    downloaded: bool  # False: it was in the cache already
    sha256: str | None  # verified digest; None when the cached file was trusted without hashing


def fetch(model: HubModel, *, reverify: bool = False, progress: bool = True) -> Fetched:
    """The model's file, verified.

    A cached file is trusted after cheap checks (size, blob name) unless `reverify`, which
    hashes it again. A missing file is downloaded (an error when offline), then its size and
    sha256 are checked against the table and the hub's metadata."""
    path = cached_file(model)
    if path is not None:
        _quick_check(model, path)
        if not reverify:
            return Fetched(model, path, downloaded=False, sha256=None)
        expected = model.sha256 or _blob_digest(path)
        return Fetched(model, path, False, verify(model, path, size=None, sha256=expected, progress=progress))
    if is_offline():
        raise ModelHubError(f"{model.name} is not in the cache ({cache_dir()}) and HF_HUB_OFFLINE is set: "
                            f"run `rwkvstate pull {model.name}` where the hub can be reached")  # fmt: skip
    meta = remote_metadata(model)
    expected = expected_digest(model, meta.etag)
    if model.size is not None and meta.size is not None and meta.size != model.size:
        raise ModelHubError(f"the hub now serves {model.filename} with {meta.size:,} bytes, "
                            f"published {model.size:,}; refusing it")  # fmt: skip
    path = download(model, progress=progress)
    digest = verify(model, path, size=meta.size, sha256=expected, progress=progress)
    return Fetched(model, path, downloaded=True, sha256=digest)


def _blob_digest(path: Path) -> str | None:
    """The sha256 the cache recorded for this file (its blob's name), if it is one."""
    blob = Path(os.path.realpath(path)).name
    return blob if _SHA256.match(blob) else None


def _hub_error(model: HubModel, e: Exception) -> ModelHubError:
    """One line for a huggingface_hub failure, naming the model and what to do."""
    from huggingface_hub import errors

    where = f"{model.repo}/{model.filename}@{model.revision[:12]}"
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return ModelHubError(f"the hub has no {where} (removed or renamed?); pass --model with a file path instead")
    if isinstance(e, errors.RevisionNotFoundError):
        return ModelHubError(f"the hub has no revision {model.revision} of {model.repo}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ModelHubError(f"the hub has no repository {model.repo} (or it needs a token: set HF_TOKEN)")
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return ModelHubError(f"cannot download {where}: the hub ({endpoint()}) is unreachable or offline mode "
                             f"is on, and the file is not cached")  # fmt: skip
    if _is_connection_error(e):
        return ModelHubError(f"cannot reach the hub at {endpoint()} ({first_line(e)}) to download {where}; "
                             f"HF_ENDPOINT sets the hub, HF_HUB_OFFLINE=1 uses only the cache")  # fmt: skip
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return ModelHubError(f"downloading {where} failed: HTTP {status} from {endpoint()}")
    return ModelHubError(f"downloading {where} failed: {type(e).__name__}: {first_line(e)}")


def _is_connection_error(e: BaseException) -> bool:
    """A refused, unresolvable or timed-out connection, from huggingface_hub's HTTP client
    (httpx or httpx2, depending on its version) or the socket layer."""
    kind = type(e)
    from_http_client = kind.__module__.split(".")[0] in ("httpx", "httpx2")
    transport = "Connect" in kind.__name__ or "Timeout" in kind.__name__
    return isinstance(e, ConnectionError) or (from_http_client and transport)


def _quiet_tqdm():
    """A tqdm class that shows nothing (huggingface_hub takes a tqdm class, not a flag)."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


# ---- listing ---------------------------------------------------------------------------------------


def listing() -> list[tuple[HubModel, Path | None]]:
    """Every known model with its cached file (None if not cached), in table order."""
    return [(m, cached_file(m)) for m in KNOWN_MODELS.values()]
