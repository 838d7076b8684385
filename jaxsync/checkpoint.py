"""Checkpoints with Orbax: atomic writes, the last K kept, restored with the template's shardings.

A checkpoint is one Orbax step ``<directory>/<step>`` holding two items: ``state`` (any pytree of
arrays: parameters, optimizer state, typed PRNG keys, ...) and ``meta`` (a JSON object: the config,
the data position, the last logged metrics). Any experiment adopts it in a few lines::

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
    if (step := ckpt.latest_step()) is not None:
        tree, meta = ckpt.restore(step, template=tree)   # template: arrays with the right shardings
    ...
    ckpt.save(step, tree, meta={"config": dataclasses.asdict(cfg)})

Everything goes through ``orbax.checkpoint.CheckpointManager``'s public methods (``all_steps``,
``save``, ``restore``, ``item_metadata``); this module never reads Orbax's files itself.

Why it is safe to kill at any moment: Orbax writes a step into a temporary folder and renames it
to ``<step>`` only once every file is written (``orbax.checkpoint.path.atomicity``; a rename is
atomic on a POSIX file system). A crash mid-write leaves only the temporary folder, which
``CheckpointManager.all_steps`` never lists; Orbax replaces it when the same step is saved again.
Nothing else in the folder is ever deleted except checkpoints beyond the last K.

Writes are synchronous on purpose: the training steps donate their state, and an asynchronous save
could still be reading host copies that alias donated CPU buffers. Saving the tiny states of this
codebase takes ~0.1 s.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax

from jaxsync import ConfigError

FORMAT = "jaxsync-checkpoint/1"
ITEMS = ("state", "meta")


def _manager(directory: str, keep: int = 1, read_only: bool = False):
    """A CheckpointManager for jaxsync's two items; it creates nothing until its first save."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=False, read_only=read_only
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def is_unfinished(path: str) -> bool:
    """True for a step folder whose Orbax write never finished (a crash mid-save)."""
    import orbax.checkpoint as ocp
    from etils import epath

    return os.path.isdir(path) and ocp.path.step.is_path_temporary(epath.Path(path))


def _checked_steps(directory: str, manager) -> list[int]:
    """``manager``'s finished steps, after checking the folder holds nothing else.

    Raises:
      ConfigError: ``directory`` is a file, or holds anything that is neither a checkpoint Orbax
        lists nor an unfinished Orbax write, or a listed step lacks one of the two items.
    """
    if not os.path.exists(directory):
        return []
    if not os.path.isdir(directory):
        raise ConfigError(f"checkpoint folder {directory} is a file, not a folder")
    steps = _steps(manager)
    foreign = _foreign_entry(directory, steps)
    if foreign is not None:  # a write may have finished between the two listings: look again
        steps = _steps(manager)
        foreign = _foreign_entry(directory, steps)
    if foreign is not None:
        raise ConfigError(
            f"{foreign} is not a jaxsync checkpoint; the folder {directory} must hold "
            "only checkpoints: move that file out and run again"
        )
    for step in steps:
        try:
            have = set(manager.item_metadata(step).keys())
        except Exception:  # noqa: BLE001 — unreadable: restoring this step names the problem
            continue
        missing = [item for item in ITEMS if item not in have]
        if missing:
            path = os.path.join(directory, str(step))
            raise ConfigError(
                f"checkpoint {path} is corrupt or foreign (no {missing[0]}); "
                "move it out of the folder to resume from an earlier one"
            )
    return steps


def _steps(manager) -> list[int]:
    manager.reload()  # another process (or a crash) may have changed the folder
    return sorted(int(s) for s in manager.all_steps())


def _foreign_entry(directory: str, steps) -> str | None:
    """The first entry that is neither a listed step nor an unfinished write (None: all fine)."""
    import orbax.checkpoint as ocp

    # Orbax's own root-level metadata folder, written only when asked for; allowed all the same.
    allowed = {str(s) for s in steps} | {ocp.checkpoint_manager.METADATA_ITEM_NAME}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name in allowed or not os.path.lexists(path) or is_unfinished(path):
            continue
        return path
    return None


def scan(directory: str) -> list[int]:
    """Sorted steps of the finished checkpoints in ``directory`` ([] when it does not exist).

    Opens a read-only ``CheckpointManager``, so it is safe to call while another process writes.

    Raises:
      ConfigError: ``directory`` is a file, or holds anything that is neither a finished checkpoint
        nor an unfinished Orbax write (a foreign file, or a step folder missing its parts).
    """
    manager = _manager(os.path.abspath(directory), read_only=True)
    try:
        return _checked_steps(os.path.abspath(directory), manager)
    finally:
        manager.close()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _flat_layout(tree) -> dict:
    """``{"a/b/0": (shape, dtype)}`` of every leaf. Orbax saves NamedTuples as dicts and tuples
    as lists, so attribute names, keys and indices all become plain path parts."""

    def part(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(part(k) for k in path): (tuple(x.shape), str(x.dtype)) for path, x in leaves}


def _check_layout(where: str, saved, template) -> None:
    """ConfigError naming the first leaf whose path, shape or dtype differs."""
    have, want = _flat_layout(saved), _flat_layout(template)
    for path in sorted(set(have) | set(want)):
        if have.get(path) != want.get(path):
            raise ConfigError(
                f"checkpoint {where} does not fit this run (another model, strategy or "
                f"optimizer?): {path or 'the tree'} is {_show(have.get(path))} there, "
                f"{_show(want.get(path))} here"
            )


def _show(leaf) -> str:
    return "missing" if leaf is None else f"{leaf[1]}{list(leaf[0])}"


class Checkpointer:
    """Save and restore pytrees under ``directory``, keeping the ``keep`` most recent steps.

    Every process of a multi-host run must call :meth:`save` and :meth:`restore` (Orbax writes
    each process's shards and has process 0 finalize). The folder is created on the first save, so a
    run rejected during setup leaves nothing behind.
    """

    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ConfigError(f"--keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self._manager = None
        self.all_steps()  # fail now, before any training, on a foreign or corrupt folder

    def all_steps(self) -> list[int]:
        """Sorted steps of the finished checkpoints; see :func:`scan` for the errors."""
        return _checked_steps(self.directory, self._mgr())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _mgr(self):
        if self._manager is None:
            self._manager = _manager(self.directory, self.keep)
        return self._manager

    def save(self, step: int, tree: Any, meta: dict | None = None) -> None:
        """Write ``tree`` (arrays, typed PRNG keys) and the JSON object ``meta`` as step ``step``.

        Returns once the checkpoint is finalized on disk; then deletes the oldest ones beyond K.
        """
        import orbax.checkpoint as ocp

        meta = {"format": FORMAT, "step": int(step), **(meta or {})}
        json.dumps(meta)  # fail before writing anything if meta is not JSON
        os.makedirs(self.directory, exist_ok=True)  # every process: a shared folder races
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        self._mgr().save(int(step), args=args, force=True)
        self._mgr().wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The JSON object saved with ``step``; ConfigError when it is not a jaxsync checkpoint."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        try:
            meta = self._mgr().restore(int(step), args=args).meta
        except Exception as e:  # noqa: BLE001 — missing item, bad JSON, unreadable file
            raise ConfigError(
                f"checkpoint {self._path(step)} is corrupt: cannot read its metadata "
                f"({type(e).__name__})"
            ) from None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT:
            raise ConfigError(
                f"checkpoint {self._path(step)} was not written by jaxsync "
                f"(format {fmt!r}, expected {FORMAT!r})"
            )
        return meta

    def restore(self, step: int | None = None, template: Any = None) -> tuple[Any, dict]:
        """Load step ``step`` (the latest when None) as ``(tree, meta)``.

        Args:
          template: a pytree like the saved one, of arrays or ``jax.ShapeDtypeStruct`` s; each
            leaf is restored with the template's shape, dtype and sharding (a strategy's ``init``
            gives one). None restores with the shardings recorded at save time.
        Raises:
          ConfigError: there is no checkpoint, or it is corrupt, or it does not match the template
            (another model, strategy or optimizer).
        """
        import orbax.checkpoint as ocp

        if step is None:
            step = self.latest_step()
            if step is None:
                raise ConfigError(f"no checkpoint in {self.directory}")
        meta = self.read_meta(step)
        abstract = None
        if template is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            with self._loading(step):
                saved = self._mgr().item_metadata(int(step))["state"]
            # Checked up front: a failed Orbax restore leaves reads pending that spill
            # tracebacks at exit, and this names the leaf that differs.
            _check_layout(self._path(step), saved, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        with self._loading(step):
            tree = self._mgr().restore(int(step), args=args).state
        return tree, meta

    @contextlib.contextmanager
    def _loading(self, step):
        try:
            yield
        except Exception as e:  # Orbax/TensorStore raise many types; all mean "cannot load this"
            raise ConfigError(
                f"checkpoint {self._path(step)} is corrupt: {_first_line(e)}"
            ) from None

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
