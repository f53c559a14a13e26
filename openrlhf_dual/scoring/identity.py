"""What a score source or model location points at, as a fingerprint that changes when it does.

prepare records these in the prep directory's manifest and compares them on every rerun, so scores
of a changed source are never mixed with scores of the old one. Kept cheap (milliseconds, about
1 MiB read per weight file) because it runs on every resume:

- `file:` the sha256 of the reward file's bytes. Modules it imports are not covered.
- a local checkpoint directory (`rm:`, `safe_rlhf:`, `policy:`, the reference model): the sha256 of
  every config, tokenizer and code file in it, and per weight file (*.safetensors, *.bin, *.pt)
  its size, the sha256 of its safetensors header (tensor names, dtypes, shapes, offsets) and the
  sha256 of 16 slices of 64 KiB spread over it (of all of it when smaller). A retrained checkpoint
  of the same shape changes every slice; a change confined to bytes no slice covers is missed.
- `remote:` what the server states about itself at GET /identity beside its URL's path
  (openrlhf_dual.cli.serve_reward states the identities of its prep directory's sources and its
  lambda). A server that states nothing (OpenRLHF's serve_rm) is recorded as stating nothing: a
  model swapped behind its URL cannot be seen.
- a hub name (a location that is no local path): the commit it resolves to (openrlhf_dual.scoring.
  hub, honouring a `revision=` option) and the identity of that snapshot's files.

Identities are flat {key: str} dicts (nested stated identities are flattened to dotted keys), so
`changes` can say exactly what differs.
"""

from __future__ import annotations

import hashlib
import json
import struct
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from openrlhf_dual.scoring import SourceSpec, parse_source

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HASHED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")
SLICES, SLICE_BYTES = 16, 64 << 10


class IdentityError(RuntimeError):
    """A source whose identity cannot be read (e.g. a remote server that does not answer)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_identity(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"{path} is not a file")
    return {"sha256": _sha(path.read_bytes())}


def _weights_identity(path: Path) -> str:
    """'<size> bytes, header <sha>, sampled <sha>' of one weight file, reading about 1 MiB."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = "-"
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            header = _sha(f.read(n)) if 8 + n <= size else "not a safetensors header"
        h = hashlib.sha256()
        if size <= SLICES * SLICE_BYTES:
            f.seek(0)
            h.update(f.read())
        else:
            for i in range(SLICES):
                f.seek((size - SLICE_BYTES) * i // (SLICES - 1))
                h.update(f.read(SLICE_BYTES))
    return f"{size} bytes, header {header}, sampled {h.hexdigest()[:16]}"


def checkpoint_identity(path: str | Path) -> dict:
    """{file name: identity} of a local checkpoint directory's top-level config, tokenizer, code
    and weight files."""
    path = Path(path)
    out = {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.suffix in WEIGHT_SUFFIXES:
            out[f.name] = _weights_identity(f)
        elif f.suffix in HASHED_SUFFIXES:
            out[f.name] = f"sha256 {_sha(f.read_bytes())}"
    if not out:
        raise IdentityError(f"{path} holds no checkpoint files")
    return out


def model_identity(location: str, revision: str | None = None) -> dict:
    """A model given as a local directory or a hub name (the reference model, checkpoints,
    policies): a hub name is resolved to its snapshot in the local hub cache
    (openrlhf_dual.scoring.hub) and identified by the commit it resolved to and its files."""
    from openrlhf_dual.scoring.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(location, revision)
    found = checkpoint_identity(checkpoint.path)
    return {"revision": checkpoint.revision, **found} if checkpoint.revision else found


def identity_url(url: str) -> str:
    """GET /identity beside a reward URL: http://host:5000/get_reward -> http://host:5000/identity."""
    return urllib.parse.urljoin(url, "identity")


def remote_identity(url: str, timeout: float = 10.0) -> dict:
    """What the server at `url` states about itself, flattened; {"stated": "nothing"} when it has
    no identity endpoint. Raises IdentityError when it does not answer at all."""
    try:
        with urllib.request.urlopen(identity_url(url), timeout=timeout) as response:
            stated = json.loads(response.read())
    except urllib.error.HTTPError:
        return {"stated": "nothing"}
    except (urllib.error.URLError, OSError) as err:
        raise IdentityError(f"{url} does not answer ({err}): cannot check what it serves") from err
    except ValueError:  # not JSON: not an identity
        return {"stated": "nothing"}
    return _flat(stated, "stated") if isinstance(stated, dict) and stated else {"stated": "nothing"}


def source_identity(spec: str | SourceSpec, role: str = "reward") -> dict:
    """The identity of what a source spec points at (see the module's docstring), flat {key: str}."""
    spec = parse_source(spec, role) if isinstance(spec, str) else spec
    if spec.kind == "file":
        return file_identity(spec.location)
    if spec.kind == "remote":
        return remote_identity(spec.location, spec.option("timeout", 10.0))
    return model_identity(spec.location, spec.options.get("revision"))


def setup_identity(ref_model: str, reward: str, safety) -> dict:
    """{"ref_model": identity, "sources": [{"spec", "identity"}]} of a prep setup: the reference
    model, then the reward source and each safety source in order."""
    specs = [(reward, "reward"), *((s, "safety") for s in safety)]
    return {"ref_model": model_identity(ref_model),
            "sources": [{"spec": s, "identity": source_identity(s, role)} for s, role in specs]}  # fmt: skip


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two identities, one line per key: 'KEY: OLD -> NEW'."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in keys if old.get(k) != new.get(k)]


def _flat(obj, prefix: str) -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in _flat(value, f"{prefix}.{i}").items()}
    return {prefix: json.dumps(obj)}
