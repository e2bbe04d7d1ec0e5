"""The recipe: one strict pydantic schema for every stage, and its loader."""
from recipes.loader import RECIPES_DIR, RecipeError, load_recipe, recipe_hash, recipe_names, recipe_path, resolve_recipe
from recipes.schema import Recipe

__all__ = ["RECIPES_DIR", "Recipe", "RecipeError", "load_recipe", "recipe_hash", "recipe_names", "recipe_path", "resolve_recipe"]
