"""A recipe run whole: ``api.compress``, then, when the recipe has a ``heal:`` section, ``heal.heal`` on the
compressed output before anything is placed at ``--out``.

The compressed output is written to a work folder beside ``--out`` (``.NAME.heal-*``, made and always removed
by this run), healed into ``--out`` through heal's own output guard, so ``--out`` only ever holds the healed
output, and an error or signal leaves nothing there. A recipe without ``heal:`` is ``api.compress`` itself.
A heal trains what a compressed output stores as small parts, so ``--merge`` (dense weights) and ``--resume``
(a streamed run's records, which belong to the work folder's unhealed output) are refused with such a recipe.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import api
from . import calibration as sources
from . import heal as healing
from .errors import CompressorError
from .io import check_output
from .plan import recipe as recipes
from .plan.recipe import Recipe


def heal_section(recipe: str | Recipe, overrides: list[str] | None) -> recipes.HealConfig | None:
    """The recipe's ``heal:`` section with the overrides applied (None: the recipe does not heal)."""
    return (recipe if isinstance(recipe, Recipe) else recipes.load(recipe, overrides)).heal


def compress(model: str, recipe: str | Recipe, out: str | Path, *, overrides: list[str] | None = None,
             device: str = "cpu", overwrite: bool = False, merge: bool = False, resume: bool = False,
             dry_run: bool = False, say: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """``api.compress`` (same arguments, same summary), then the recipe's heal, if it has one: the summary's
    ``healing`` is heal's record and ``model`` the healed model. ``options``: the rest of ``api.compress``'s."""
    heal = heal_section(recipe, overrides)
    if heal is None:
        return api.compress(model, recipe, out, overrides=overrides, device=device, overwrite=overwrite,
                            merge=merge, resume=resume, dry_run=dry_run, say=say, **options)
    if merge:
        raise CompressorError("--merge: this recipe heals its output, which trains the small parts a merged "
                              "output no longer has; compress without --merge")
    if resume:
        raise CompressorError("--resume: a recipe with a heal: section cannot resume (its interrupted run "
                              "left no output); run the command again without --resume")
    out = Path(out).expanduser()
    if dry_run:
        summary = api.compress(model, recipe, out, overrides=overrides, device=device, overwrite=overwrite,
                               dry_run=True, **options)
        summary["dry_run"]["heal"] = dataclasses.asdict(heal)
        return summary
    check_output(out, overwrite, [model])  # before the compression's work, not after it
    if heal.dataset is not None:
        sources.get(heal.dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.heal-", dir=out.parent))
    try:
        summary = api.compress(model, recipe, work / "compressed", overrides=overrides, device=device, say=say,
                               **options)
        if say is not None:
            say(f"healing the compressed output: {heal.describe()}")
        record = healing.heal(work / "compressed", out, device=device, overwrite=overwrite, say=say,
                              **dataclasses.asdict(heal))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model_healed = record.pop("model")
    seconds = {**summary["seconds"], "heal": record["seconds"]}  # the run's phases, the heal's whole command last
    return {**summary, "out": record["out"], "healing": record, "model": model_healed, "seconds": seconds}
