"""The recipe: one strict pydantic schema for every stage, and its loader."""
from recipes.loader import RecipeError, load_recipe, recipe_hash
from recipes.schema import Recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_hash"]
