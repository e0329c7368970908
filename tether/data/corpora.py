"""The real text corpora in the shared data folder (NLTK zips, read with zipfile; NLTK itself is not
needed), the stable held-out split by review id, and where the shared data and tether's cache live."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tether.config import ConfigError

CORPORA = {
    # name -> zip file under nltk_data/corpora
    "movie_reviews": "movie_reviews.zip",
    "sentence_polarity": "sentence_polarity.zip",
    "subjectivity": "subjectivity.zip",
}


# -- Where the shared data and the cache live ------------------------------------------------------


def shared_data_dir() -> Path:
    """$TETHER_DATA, else `<repo>/../shared/data` next to the checkout of this package."""
    env = os.environ.get("TETHER_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for c in candidates:
        if (c / "nltk_data" / "corpora").is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"the shared data folder was not found (tried {tried}); set TETHER_DATA to the folder that holds "
        "nltk_data/corpora/movie_reviews.zip"
    )


def cache_dir() -> Path:
    """$TETHER_CACHE, else $XDG_CACHE_HOME/tether, else ~/.cache/tether."""
    if os.environ.get("TETHER_CACHE"):
        return Path(os.environ["TETHER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tether"


# -- Corpora ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Review:
    id: str  # e.g. "movie_reviews/pos/cv000_29416" or "sentence_polarity/neg/17"
    label: str  # pos / neg (the corpus's own label; never used for training signals)
    lines: tuple[str, ...]  # sentences, as in the corpus (lower case, spaced punctuation)


def _zip(name: str) -> zipfile.ZipFile:
    if name not in CORPORA:
        raise ConfigError(f"config key 'corpora': unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    path = shared_data_dir() / "nltk_data" / "corpora" / CORPORA[name]
    if not path.exists():
        raise ConfigError(f"corpus {name}: {path} is missing")
    return zipfile.ZipFile(path)


def read_reviews(name: str) -> list[Review]:
    """All documents of one corpus, in a fixed order."""
    z = _zip(name)
    out: list[Review] = []
    if name == "movie_reviews":
        for n in sorted(z.namelist()):
            if n.endswith(".txt"):
                lines = tuple(line.strip() for line in z.read(n).decode("utf-8").splitlines() if line.strip())
                if lines:
                    out.append(Review(n[: -len(".txt")], n.split("/")[1], lines))
    elif name in ("sentence_polarity", "subjectivity"):  # a sentence per line; (member, label, encoding) per file
        files = ([(f"sentence_polarity/rt-polarity.{label}", label, "utf-8") for label in ("pos", "neg")] if name == "sentence_polarity" else
                 [(n, "subj" if "quote" in n else "obj", "latin-1") for n in sorted(z.namelist()) if n.endswith(".5000")])
        for member, label, encoding in files:
            text = z.read(member).decode(encoding, errors="replace")
            out += [Review(f"{name}/{label}/{i}", label, (line.strip(),)) for i, line in enumerate(text.splitlines()) if line.strip()]
    return out


def is_held_out(review_id: str, fraction: float) -> bool:
    """A stable split by a hash of the id: the same reviews are held out in every stage and run."""
    h = int.from_bytes(hashlib.sha256(review_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def corpus_fingerprint(names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    root = shared_data_dir() / "nltk_data" / "corpora"
    for n in names:
        h.update(n.encode())
        h.update(hashlib.sha256((root / CORPORA[n]).read_bytes()).digest())
    return h.hexdigest()
