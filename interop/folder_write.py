"""Saving adapter folders without ever losing a file.

`write_adapter_folders` writes each file a save owns -- `adapter_config.json` and
`adapter_model.safetensors` of each adapter folder, nothing else -- under a temporary name beside the
final one (`.adapter_model.safetensors.<token>.tmp`, `safetensors_io.temp_path`), flushes it to
disk, and renames it over the final name (`os.replace`, atomic on POSIX). It never moves, deletes
or hides a file it did not write: other files and folders (a user's notes, other adapters'
sub-folders) stay where they are, untouched. The model card (`README.md`, PEFT's, given as `card`)
is written only where the folder has none, and atomically (a complete temporary file hard-linked to
the name, which fails if the name exists): an existing `README.md` -- yours, or the card of an
earlier save -- is never replaced. Paths are used as given, so a
`save_directory` that is a symbolic link to a folder is written into (its target), as by PEFT; a
file that is itself a link (a Hub cache snapshot) is replaced by a regular file, its target left as
it was.

What a save guarantees, for each adapter folder it writes, whenever it is killed (SIGKILL included):

* every file it did not write is where it was, unchanged;
* each of the two files is complete: the old one or the new one, never a mix;
* the weights are renamed before the config, so the only mixed state is new weights with the old
  config, left by a kill between the two renames. The config's temporary file marks it: if the two
  configs differ, miss-jax's loaders refuse the folder naming the one-line fix (`mv` of that file),
  and the next save into the folder completes the rename first; if they are equal (re-saving the
  same adapter, as during training) the folder is consistent as it is. PyTorch PEFT (which writes
  its own files in place, non-atomically) would read the mixed state as it is;
* the temporary files of a killed save are left behind, recognisable by their names; the next
  save into the folder removes them (or completes the rename above).

Concurrent saves (threads or processes on one machine) into the same folders are serialized by an
advisory lock (`flock`) on each folder, so each folder ends up holding one of them, complete (a
file system without `flock` gets unlocked saves). A load is not locked: one that reads the config
just before a save's two renames and the weights just after gets a mixed pair. A failed save (an
exception before its first rename) leaves everything as it was and removes the folders it created.
Where a folder is not writable the save fails with PermissionError before changing anything, as
PEFT's does; a read-only parent does not matter. POSIX only (`fcntl`; `os.replace` over an
existing file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

from . import safetensors_io as files

# Names an adapter's sub-folder may not take: the files of the folder it sits in.
CARD_NAME = "README.md"  # the model card
RESERVED_NAMES = frozenset({files.CONFIG_NAME, files.WEIGHTS_NAME, files.PICKLE_NAME, CARD_NAME})
# errnos of a file system that cannot lock or fsync a folder: the save goes on without
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP})


def check_sub_folder(name: str) -> None:
    """ValueError unless `name` (an adapter other than `default`) can be the name of its sub-folder:
    one plain path component, not `.`/`..`, and not the name of a file of the adapter folder."""
    if (not name or name in (".", "..") or os.sep in name or (os.altsep or os.sep) in name or "\0" in name
            or len(name.encode()) > 255):
        raise ValueError(
            f"Adapter name {name!r} cannot be saved: adapters other than 'default' are saved in a sub-folder named "
            "after them, so the name must be one plain folder name. Rename the adapter."
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"Adapter name {name!r} cannot be saved: adapters other than 'default' are saved in a sub-folder named "
            f"after them, and {name!r} is the name of a file of the adapter folder ({sorted(RESERVED_NAMES)} are "
            "taken). Rename the adapter."
        )


def check_dtype(dtype: Optional[Any]) -> None:
    """ValueError unless `dtype` (a save's tensor dtype; None keeps each tensor's) is a floating dtype: adapter
    weights cast to an integer or bool dtype would be rounded (mostly to zeros) and reload silently wrong."""
    import jax.numpy as jnp

    try:
        floating = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        raise ValueError(f"dtype={dtype!r} is not a dtype; pass a floating dtype such as jnp.float32.") from None
    if not floating:
        raise ValueError(
            f"dtype={jnp.dtype(dtype).name} cannot hold adapter weights (they would be rounded to integers, mostly "
            "zeros); pass a floating dtype such as jnp.float32 (PEFT's default), jnp.bfloat16, or None to keep each "
            "tensor's own."
        )


def _make_folders(folders: Sequence[str]) -> list[str]:
    """Creates the missing ones among `folders` (and their missing parents); returns those it created,
    parents first. ValueError if one of them exists and is not a folder."""
    created = []
    for folder in folders:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"Cannot save into {folder!r}: it exists and is not a folder. Move it or save elsewhere.")
        missing = []
        path = os.path.abspath(folder)
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path)
                created.append(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
    return created


def _remove_empty(folders: Sequence[str]) -> None:
    """Removes each of `folders` that is empty, last first (a folder someone filled meanwhile stays)."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def _locked(folders: Sequence[str]) -> Iterator[dict[str, int]]:
    """Holds an exclusive `flock` on each folder (in one global order: no deadlock between savers of
    overlapping sets); yields `{folder: descriptor}` (open read-only, usable for `fsync`)."""
    with contextlib.ExitStack() as stack:
        by_real = {os.path.realpath(f): f for f in folders}
        fds = {}
        for real in sorted(by_real):
            fd = os.open(real, os.O_RDONLY)
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:  # a file system without locks (some network mounts): save unlocked, as PEFT
                if e.errno not in _UNSUPPORTED:
                    raise
            fds[by_real[real]] = fd
        yield {f: fds[by_real[os.path.realpath(f)]] for f in folders}


def _tidy(folder: str) -> None:
    """Deals with the temporary files killed saves left in `folder` (run under its lock): a config
    whose weights were renamed is renamed into place (finishing that save), the rest removed (config
    before weights, so that a kill here never makes a finished save look unfinished)."""
    temps = files.temp_files(folder)
    for (name, token), path in sorted(temps.items()):
        if name == files.CONFIG_NAME and (files.WEIGHTS_NAME, token) not in temps:
            os.replace(path, os.path.join(folder, files.CONFIG_NAME))
        elif name == files.CONFIG_NAME:
            os.remove(path)
    for (name, _), path in temps.items():
        if name == files.WEIGHTS_NAME:
            os.remove(path)


def _write_temp(path: str, write: Callable[[str], None], written: list[str]) -> None:
    """Writes `path` through `write` and flushes it to disk; `path` joins `written` before it exists."""
    written.append(path)
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_card(folder: str, card: str, token: str) -> None:
    """Writes `card` as `folder/README.md` if there is none, atomically; an existing one is left as it is."""
    final = os.path.join(folder, CARD_NAME)
    if os.path.lexists(final):
        return
    temp = files.temp_path(final, token)
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(card)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, final)
        except FileExistsError:  # written meanwhile: theirs stays
            pass
        except OSError as e:  # a file system without hard links: the adapter is saved, without a card
            if e.errno not in _UNSUPPORTED | {errno.EPERM}:
                raise
            warnings.warn(f"No model card written to {final!r}: the file system cannot link files ({e}).")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def write_adapter_folders(
    save_directory: str, folders: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
    card: Optional[str] = None,
) -> None:
    """Writes each `(adapter_config, tensors)` into `save_directory/<relative>` ("" is `save_directory`
    itself), replacing only those two files of each folder (see the module docstring for the guarantees),
    and `card` as `save_directory/README.md` where there is none (`write_card`), after the adapter files.

    Raises ValueError, before writing anything, for a relative name that cannot be a sub-folder
    (`check_sub_folder`) or a path that exists and is not a folder, and OSError (PermissionError for a
    read-only folder) as the file system reports it.
    """
    for relative in folders:
        if relative:
            check_sub_folder(relative)
    targets = {os.path.join(save_directory, rel) if rel else save_directory: v for rel, v in folders.items()}
    for folder in targets:
        for name in (files.WEIGHTS_NAME, files.CONFIG_NAME):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                raise ValueError(f"Cannot save {path!r}: a folder has that name. Move it away and save again.")
    created = _make_folders(list(targets))
    for folder in targets:
        if not os.access(folder, os.W_OK | os.X_OK):
            _remove_empty(created)
            raise PermissionError(
                errno.EACCES, f"Cannot save into {folder!r}: the folder is not writable. Make it writable "
                "(chmod u+w) or save elsewhere."
            )
    token = secrets.token_hex(6)
    plan = [  # weights before config in each folder: see the module docstring
        (folder, name, write)
        for folder, (config, tensors) in targets.items()
        for name, write in (
            (files.WEIGHTS_NAME, functools.partial(files.write_tensors, tensors=tensors)),
            (files.CONFIG_NAME, functools.partial(files.write_config, config=config)),
        )
    ]
    written: list[str] = []
    renamed = 0
    try:
        with _locked(list(targets)) as fds:
            for folder in targets:
                _tidy(folder)
            for folder, name, write in plan:
                _write_temp(files.temp_path(os.path.join(folder, name), token), write, written)
            for path, (folder, name, _) in zip(written, plan):
                os.replace(path, os.path.join(folder, name))
                renamed += 1
            if card is not None:
                write_card(save_directory, card, token)
            for fd in fds.values():  # the renames themselves to disk
                try:
                    os.fsync(fd)
                except OSError as e:
                    if e.errno not in _UNSUPPORTED:
                        raise
    except BaseException:
        if not renamed:
            for path in reversed(written):  # config before weights (see _tidy)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            _remove_empty(created)
        raise
