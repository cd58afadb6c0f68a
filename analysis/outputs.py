"""Which files a command may write over: never one it reads, and otherwise only those an
earlier attnlab run wrote there.

Each folder attnlab writes into holds a manifest, `.attnlab-outputs`: one line per file a run
wrote, with the command that wrote it. The rules:

- No output replaces an input: an output folder may not hold (or link to) a file the run reads
  measurements from, nor any file named on the command line; a file output may not be one.
  `--force` does not override this.
- No output is written through a link (it would land on whatever the link names), nor at a
  path another output of the same run takes. `--force` does not override this either.
- `analyze` and `report` own their folder: every file in it must be one the manifest lists,
  else the run stops before writing anything unless forced. Afterwards the manifest lists what
  the run wrote, and the files an earlier `analyze` or `report` listed that this run did not
  write (a chart of a workload no longer measured) are removed, so no stale output remains.
- `claim` writes single files; each may replace a file its folder's manifest lists, or one
  `is_own` recognises, and anything else only when forced. It never removes files.

A run that fails part way lists the files it had created, so that the next run may replace them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST = ".attnlab-outputs"
HEADER = "# attnlab outputs: each file an attnlab command wrote in this folder, after the command's name."
FOLDER_COMMANDS = ("analyze", "report")   # commands that own a whole folder and prune what they no longer write


class OutputError(ValueError):
    """An output that would replace an input, or a file attnlab did not write; the message
    names the flag."""


@dataclass
class Manifest:
    """The files attnlab wrote in `folder`: path relative to it (POSIX) -> command."""

    folder: Path
    entries: dict = field(default_factory=dict)
    foreign: bool = False   # a file of that name exists but is not a manifest attnlab wrote

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST
        if not path.exists() and not path.is_symlink():
            return cls(folder)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return cls(folder, foreign=True)
        if path.is_symlink() or not lines or lines[0] != HEADER:
            return cls(folder, foreign=True)
        pairs = (line.split("\t", 1) for line in lines[1:] if "\t" in line)
        return cls(folder, {rel: command for command, rel in pairs if _inside(rel)})

    def owns(self, rel: str) -> bool:
        return rel in self.entries

    def write(self) -> None:
        """Write the manifest, listing only files that exist; replaced in one step, so that a
        run killed here leaves the old list or the new one."""
        kept = sorted(rel for rel in self.entries if (self.folder / rel).is_file())
        text = "\n".join([HEADER] + [f"{self.entries[rel]}\t{rel}" for rel in kept]) + "\n"
        temporary = self.folder / f"{MANIFEST}.tmp"
        temporary.unlink(missing_ok=True)     # a killed run's, or a link: never written through
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, self.folder / MANIFEST)


def _inside(rel: str) -> bool:
    """A manifest line names a path below its folder: never absolute, never through '..'."""
    path = PurePosixPath(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts


@contextmanager
def owned_folder(out, *, flag: str, inputs, command: str, force: bool = False):
    """Check that `command` may write into folder `out` (see the module docstring), create it,
    and yield a list for the caller to extend with the paths it writes; on leaving, record
    them in the manifest and remove the stale files of earlier runs. OutputError naming `flag`
    when the folder is not the run's to write."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag}: expected a folder, got {str(out)!r}, which is a file")
    before = _entries(folder)
    _refuse_inputs(flag, inputs, [folder, *(e for e in before if e.is_symlink())], str(out))
    _refuse_links(flag, folder, before)
    manifest = Manifest.read(folder)
    if not force:
        _refuse_foreign(flag, folder, manifest, before)
    existed = folder.exists()
    _make_folder(folder, flag)
    written = []
    try:
        yield written
    except BaseException:
        created = set(_entries(folder)) - set(before)
        if created:
            _list(manifest, command, created)   # what a failed run created, so that a rerun may replace it
            _write_quietly(manifest)
        elif not existed:
            _remove_empty(folder)    # a run that failed before writing leaves no trace
        raise
    _remove(_replace_listing(manifest, command, written), folder)
    manifest.write()


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass     # not empty after all, or not ours to remove: it stays


def _write_quietly(manifest: Manifest) -> None:
    """Write the manifest of a failed run; a failure to do so must not hide the run's own error."""
    try:
        manifest.write()
    except OSError:
        pass


def _refuse_foreign(flag: str, folder: Path, manifest: Manifest, entries: list) -> None:
    if manifest.foreign:
        raise OutputError(f"{flag}: {folder / MANIFEST} was not written by attnlab; choose another folder or "
                          f"pass --force")
    for entry in entries:
        rel = entry.relative_to(folder).as_posix()
        if not manifest.owns(rel):
            raise OutputError(f"{flag}: {folder} holds {rel}, which no earlier attnlab run wrote there (it is not "
                              f"in {MANIFEST}); choose another folder, move the file, or pass --force")


def _refuse_links(flag: str, folder: Path, entries: list) -> None:
    """attnlab writes no links, and writes through none: a file written where one is would land
    on whatever it names, so a folder holding one is refused, whatever --force says."""
    link = next((entry for entry in entries if entry.is_symlink()), None)
    if link is not None:
        raise OutputError(f"{flag}: {folder} holds {link.relative_to(folder).as_posix()}, a link, which attnlab "
                          f"would write through even with --force; remove the link or choose another folder")


def _replace_listing(manifest: Manifest, command: str, written: list) -> list:
    """List `written` under `command`; return the files earlier folder runs wrote that this one
    did not (stale, for a folder command; none for another)."""
    mine = {_relative(path, manifest.folder) for path in written} - {None}
    stale = []
    if command in FOLDER_COMMANDS:
        stale = [rel for rel, by in manifest.entries.items() if by in FOLDER_COMMANDS and rel not in mine]
        for rel in stale:
            del manifest.entries[rel]
    _list(manifest, command, [manifest.folder / rel for rel in mine])
    return [manifest.folder / rel for rel in stale]


def _list(manifest: Manifest, command: str, paths) -> None:
    for path in paths:
        rel = _relative(path, manifest.folder)
        if rel and rel != MANIFEST:
            manifest.entries[rel] = command


def _relative(path, folder: Path):
    try:
        return Path(path).absolute().relative_to(folder.absolute()).as_posix()
    except ValueError:
        return None   # written elsewhere: not this folder's to list


def _remove(paths: list, folder: Path) -> None:
    """Remove stale files (only plain files: a link or folder put there is left alone), then
    the folders below `folder` they leave empty (charts/ after a run without charts)."""
    for path in paths:
        if path.is_file() and not path.is_symlink():
            path.unlink()
    for parent in {path.parent for path in paths} - {folder}:
        if parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()


def check_output_file(path, *, flag: str, inputs, force: bool = False, is_own=None) -> None:
    """Check that a command may write the file `path`: not an input, and absent, listed in its
    folder's manifest, recognised by `is_own(path)`, or `force`. Creates its folder."""
    target = Path(path)
    if str(path) == "-":
        raise OutputError(f"{flag}: expected a file path, got '-': this flag does not write to standard output")
    if target.is_dir():
        raise OutputError(f"{flag}: expected a file path, got {str(path)!r}, which is a folder")
    _refuse_inputs(flag, inputs, [target], str(path))
    if target.is_symlink():
        raise OutputError(f"{flag}: {str(path)!r} is a link, which attnlab would write through even with --force; "
                          f"remove the link or choose another path")
    own = Manifest.read(target.parent).owns(target.name) or (is_own and is_own(target))
    if target.exists() and not force and not own:
        raise OutputError(f"{flag}: {str(path)!r} exists and attnlab did not write it; choose another path, "
                          f"move the file, or pass --force")
    _make_folder(target.parent, flag)


def refuse_shared(outputs) -> None:
    """OutputError where two of `outputs`, (flag, path) pairs of one run, name one file: the
    second would replace the first."""
    seen = {}
    for flag, path in outputs:
        key = Path(path).resolve()
        if key in seen:
            raise OutputError(f"{flag}: {str(path)!r} is also where {seen[key]} writes; give each output its own file")
        seen[key] = flag


def record_files(paths, command: str) -> None:
    """List files `command` just wrote in the manifest of each one's folder."""
    for folder in {Path(p).parent for p in paths}:
        manifest = Manifest.read(folder)
        if not manifest.foreign:
            _list(manifest, command, [p for p in paths if Path(p).parent == folder])
            manifest.write()


def _make_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag}: cannot create the folder {str(folder)!r}: {exc.strerror or exc}") from None


def _entries(folder: Path) -> list:
    """Every file and link below `folder` (links to folders are not followed), the manifest
    itself aside; [] where the folder does not exist."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        found += [base / name for name in files]
        found += [base / name for name in dirs if (base / name).is_symlink()]
    return [path for path in found if path != folder / MANIFEST and path.name != f"{MANIFEST}.tmp"]


def _refuse_inputs(flag: str, inputs, targets: list, shown: str) -> None:
    """OutputError where an input is, or lies below, one of `targets` (resolved, links
    followed): a file named in `inputs`, or a file in a named folder that holds records."""
    roots = [Path(t).resolve() for t in targets]
    for path, named in _input_files(inputs):
        real = path.resolve()
        if any(real == root or root in real.parents for root in roots) and (named or _holds_records(path)):
            where = "is" if real == Path(shown).resolve() else f"holds or links to {str(path)!r},"
            raise OutputError(f"{flag}: {shown!r} {where} an input of this run; write the output elsewhere")


def _input_files(inputs):
    """(path, named on the command line?) for each input file, folders expanded as the loader does."""
    from attnlab.analysis.load import expand_paths

    for raw in inputs or ():
        if Path(raw).is_dir():
            yield from ((path, False) for path in expand_paths([raw]))
        elif Path(raw).exists():
            yield Path(raw), True


def _holds_records(path: Path) -> bool:
    """Whether the loader reads measurements from `path` (not attnlab's own fits or claim JSON)."""
    from attnlab.analysis.load import read_file

    try:
        records, environments, _ = read_file(path)
    except (OSError, ValueError):
        return True   # unreadable here: protect it
    return bool(records or environments)
