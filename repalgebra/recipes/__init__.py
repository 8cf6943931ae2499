"""Expansion recipes for :func:`repalgebra.expand`: one module each, named for the paper's block.

    RECIPES["repvgg"]      kxk+BN, 1x1+BN, identity BN
    RECIPES["acnet"]       kxk+BN, 1xk+BN, kx1+BN
    RECIPES["dbb"]         kxk+BN, 1x1+BN, 1x1+BN->kxk+BN, 1x1+BN->avg+BN
    RECIPES["mobileone"]   3 x (kxk+BN), 1x1+BN, identity BN; mobileone.recipe(k) for another k
"""

from __future__ import annotations

from repalgebra.recipes import acnet, dbb, mobileone, repvgg
from repalgebra.recipes.base import INITS, ExpandedConv, Recipe, Site

__all__ = ["RECIPES", "Recipe", "Site", "ExpandedConv", "INITS", "recipe_named", "mobileone"]

RECIPES: dict[str, Recipe] = {r.name: r for r in (repvgg.RECIPE, acnet.RECIPE, dbb.RECIPE, mobileone.RECIPE)}


def recipe_named(recipe: str | Recipe) -> Recipe:
    """The recipe called ``recipe`` (a :class:`Recipe` is returned as is); ValueError naming the known ones otherwise."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name ({', '.join(RECIPES)}) or a Recipe, got {type(recipe).__name__}")
    if recipe not in RECIPES:
        known = ", ".join(RECIPES)
        raise ValueError(f"unknown recipe {recipe!r}; known: {known} (repalgebra.recipes.mobileone.recipe(k) for k kxk branches)")
    return RECIPES[recipe]
