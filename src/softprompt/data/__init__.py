"""Data: readers (jsonl / json / csv / tsv / CoNLL / Hugging Face datasets -> ``list[dict]``),
the row checks that name a bad example's file, line and field, and the built-in task recipes
for the datasets of ``../shared/data``.

    from softprompt.data import read_examples, load_recipe
    examples = read_examples("reviews.csv", fields={"review": "text"}, labels=["neg", "pos"])
    recipe = load_recipe("fewglue-cb")
    train, dev = recipe.examples("train"), recipe.examples("dev")
"""

from .checks import Examples, check_fields, check_labels, check_tags, row_error, unicode_problem
from .hf import parse_hf_path
from .lama import common_vocab, lama_relations, lama_template, split_facts
from .readers import (
    FORMATS,
    DataError,
    infer_format,
    normalise_label,
    read_examples,
    read_text,
)
from .recipes import (
    ENV_VAR,
    RECIPES,
    SPLITS,
    Recipe,
    RecipeError,
    data_root_candidates,
    load_recipe,
    resolve_data_root,
)

__all__ = [
    "ENV_VAR",
    "FORMATS",
    "RECIPES",
    "SPLITS",
    "DataError",
    "Examples",
    "Recipe",
    "RecipeError",
    "check_fields",
    "check_labels",
    "check_tags",
    "common_vocab",
    "data_root_candidates",
    "infer_format",
    "lama_relations",
    "lama_template",
    "load_recipe",
    "normalise_label",
    "parse_hf_path",
    "read_examples",
    "read_text",
    "resolve_data_root",
    "row_error",
    "split_facts",
    "unicode_problem",
]
