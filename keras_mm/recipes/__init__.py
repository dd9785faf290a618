"""Typed experiment configs (dataclasses) and the named recipes.

Import explicitly: ``from keras_mm.recipes import config``; ``config.get_recipe(name)`` returns a named
recipe, ``config.override(recipe, ["train.steps=100"])`` applies ``--set`` overrides.
"""
