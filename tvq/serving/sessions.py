"""The session store of `tvq serve` (docs/DESIGN.md section 13): attention states by
session id, the most recently used in memory (pinned entries of the server's state
cache, counted in its bound: tvq.runtime.state_cache) and, with a session folder, every
one as a tvq state file (tvq.runtime.statefile), so they survive a restart.

It knows nothing of HTTP: a state file that cannot be read raises StateError, which the
engine answers as a 409.
"""

from __future__ import annotations

import collections
import re
import threading
from pathlib import Path

from tvq.runtime.context import Context
from tvq.runtime.model import Model
from tvq.runtime.state_cache import StateCache
from tvq.runtime.statefile import load_state, save_state

# A session id; it is also the state file's name, so it never holds a '/' or starts with '.'.
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def remove_stale_files(folder: Path) -> None:
    """Removes the temporary files of state files whose writing never finished (a server
    killed mid-write leaves `.NAME.state.XXXX` behind: tvq.files.atomic); a session id
    never starts with '.', so no session's file matches."""
    for stale in folder.glob(".*.state.*"):
        try:
            stale.unlink()
        except OSError:  # gone already, or not ours to remove: it does no harm
            pass


class Sessions:
    """Contexts by session id: the most recent `limit` in memory (pinned in `cache`), and
    all of them as state files in `folder` when there is one (they survive a restart). A
    session whose request runs is claimed (`claim`) until that request stores its
    context (`put`) or ends without (`release`); one deleted meanwhile stays deleted."""

    def __init__(self, model: Model, limit: int, folder: Path | None,
                 cache: StateCache | None = None) -> None:  # fmt: skip
        self.model, self.limit, self.folder = model, limit, folder
        self.cache = cache if cache is not None else StateCache(0)
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()  # in memory
        self.claimed: dict[str, bool] = {}  # per claimed session: not deleted since
        self.lock = threading.Lock()  # held while a file is written or removed
        if folder is not None:
            remove_stale_files(folder)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.state"

    def get(self, name: str) -> Context | None:
        """The session's context, None if there is none; StateError if its state file
        cannot be read."""
        with self.lock:
            if name in self.recent:
                self.recent.move_to_end(name)
                return self.cache.pinned(_pin(name))
        if self.folder is not None and self._path(name).is_file():
            return load_state(self._path(name), self.model)
        return None

    def claim(self, name: str) -> None:
        with self.lock:
            self.claimed[name] = True

    def release(self, name: str) -> None:
        with self.lock:
            self.claimed.pop(name, None)

    def busy(self) -> set[str]:
        """The claimed sessions."""
        with self.lock:
            return set(self.claimed)

    def put(self, name: str, context: Context) -> bool:
        """Stores the session's context (its file first: one that cannot be written
        leaves the session as it was) and releases it; False, storing nothing, if it was
        deleted while claimed."""
        with self.lock:
            if not self.claimed.pop(name, True):
                return False
            if self.folder is not None:
                save_state(self._path(name), self.model, context)
            self.cache.pin(_pin(name), self.model, context)
            self.recent[name] = None
            self.recent.move_to_end(name)
            while len(self.recent) > self.limit:
                self.cache.unpin(_pin(self.recent.popitem(last=False)[0]))
        return True

    def delete(self, name: str) -> bool:
        """Forgets the session; False if there was none (nothing stored, no request)."""
        with self.lock:
            found = name in self.claimed
            if found:  # its request stores nothing when it ends
                self.claimed[name] = False
            if name in self.recent:
                del self.recent[name]
                found = self.cache.unpin(_pin(name)) or found
            if self.folder is not None and self._path(name).is_file():
                self._path(name).unlink()
                found = True
        return found


def _pin(name: str) -> str:
    """A session's name in the state cache."""
    return f"session:{name}"
