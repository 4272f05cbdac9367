"""Built-in task recipes: data files + default templates + label words + metric, for the
datasets of ``../shared/data`` (see its README for sources and licences).

    recipe = load_recipe("sst2")                 # data root: argument, $SOFTPROMPT_DATA, ../shared/data
    train = recipe.examples("train")             # [{"text": ..., "label": "positive"}, ...]
    recipe.template_for(model_kind="causal", head="verbalizer")   # "[P:3] Review: {text} [P:3] Sentiment: [MASK]"
    load_recipe("lama-trex:P19").examples("test")  # [{"X": ..., "Y": ..., "relation": "P19", ...}, ...]
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..template import parse_template
from .lama import (
    common_vocab,
    lama_examples,
    lama_relations,
    lama_template,
    read_relation_templates,
)
from ..errors import DataError
from .readers import read_examples

SPLITS = ("train", "dev", "test")
TASK_KINDS = ("classification", "ner", "generation", "lama")
ENV_VAR = "SOFTPROMPT_DATA"


class RecipeError(DataError):
    """An unknown recipe, split or relation, or a recipe whose data files are missing."""


@dataclass(frozen=True)
class Recipe:
    """A built-in task: where its data is and how to prompt and score it.

    Attributes:
        name: the name `load_recipe` takes (``sst2``, ``lama-trex:P19``, ...).
        task: classification | ner | generation | lama (the example conventions of
            `softprompt.tasks.base`).
        files: split (train / dev / test) -> file, relative to the data root (LAMA: unused,
            facts come from ``lama/trex/P*.jsonl``).
        templates: ``masked`` / ``causal``: the manual prompt (no virtual tokens) for a
            masked LM (answer at ``[MASK]``) and a causal LM (answer read at the end);
            ``p-tuning-masked`` / ``p-tuning-causal``: virtual tokens ``[P:n]`` anchored
            between the fields (P-tuning v1); ``plain``: the fields only, for a head over the
            hidden states (P-tuning v2, NER) -- input methods put their ``[P:n]`` in front.
        labels: the label list (NER: the BIO tags); examples are checked against it.
        label_names: the data files' own label -> the recipe's name for it, where the files
            hold class ids (SST-2's ``0`` / ``1`` -> ``negative`` / ``positive``): examples,
            predictions, metrics and served answers then speak of the names.
        label_words: label -> verbalizer words.
        metric: the score model selection maximises; metrics: every score reported.
        reader: keyword arguments of `read_examples` (``format``, ``fields``, ``label_field``).
        notes: where the splits come from (to quote where results are reported).
        data_root: the folder `files` are relative to (set by `load_recipe`).
        relation / seed / common_vocab_only: LAMA only: one relation (None: all), the seed
            of the fact split, keep only facts whose object is in ``common_vocab_cased.txt``.
    """

    name: str
    task: str
    files: dict[str, str] = field(default_factory=dict)
    templates: dict[str, str] = field(default_factory=dict)
    labels: list[str] | None = None
    label_names: dict[str, str] | None = None
    label_words: dict[str, list[str]] | None = None
    metric: str = "accuracy"
    metrics: tuple[str, ...] = ("accuracy",)
    reader: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    data_root: Path | None = None
    relation: str | None = None
    seed: int = 0
    common_vocab_only: bool = False

    @property
    def root(self) -> Path:
        return Path(self.data_root) if self.data_root is not None else resolve_data_root()

    def paths(self) -> list[Path]:
        """Every file the recipe reads (LAMA: the relation files, relations.jsonl, the vocabulary)."""
        if self.task == "lama":
            relations = [self.relation] if self.relation else (lama_relations(self.root) or ["P*"])
            files = [f"lama/trex/{r}.jsonl" for r in relations] + ["lama/relations.jsonl"]
            files += ["lama/common_vocab_cased.txt"] if self.common_vocab_only else []
        else:
            files = list(dict.fromkeys(self.files[s] for s in SPLITS))
        return [self.root / f for f in files]

    def check(self) -> Recipe:
        """Raise `RecipeError` listing every missing file (and where the data root came from)."""
        missing = [p for p in self.paths() if not p.is_file()]
        if missing:
            looked = "\n  ".join(str(p) for p in missing)
            raise RecipeError(
                f"recipe {self.name!r}: data files not found:\n  {looked}\n"
                f"data root: {self.root} (${ENV_VAR} is {os.environ.get(ENV_VAR) or 'unset'}); "
                f"give another with --data-root or ${ENV_VAR}")
        return self

    def examples(self, split: str, *, file_labels: bool = False) -> list[dict[str, Any]]:
        """The examples of `split` (train | dev | test), read and checked.

        Args:
            split: train | dev | test.
            file_labels: keep the data files' own labels (SST-2's ``"0"`` / ``"1"``)
                rather than `label_names`: what a prompt trained before the recipe named
                its labels knows (`evaluate_trained` asks for them for such a prompt).

        Returns:
            Example dicts (see `softprompt.tasks.base`); a fresh list on every call.
        """
        if split not in SPLITS:
            close = difflib.get_close_matches(split, SPLITS + ("validation", "val"), n=1)
            hint = " ('dev' is the validation split)" if close and close[0] in ("validation", "val") else ""
            raise RecipeError(f"recipe {self.name!r} has splits {list(SPLITS)}, not {split!r}{hint}")
        if self.task == "lama":
            relations = [self.relation] if self.relation else lama_relations(self.root)
            if not relations:
                self.check()
            return lama_examples(self.root, relations, split, seed=self.seed, common_vocab_only=self.common_vocab_only)
        path = self.root / self.files[split]
        if not path.is_file():
            self.check()
        required = parse_template(self.templates["plain"]).fields
        if not self.label_names:
            return read_examples(path, labels=self.labels, required=required, **self.reader)
        examples = read_examples(path, labels=list(self.label_names), required=required, **self.reader)
        if not file_labels:
            for example in examples:  # in place: `Examples` keeps each example's line for the row checks
                example["label"] = self.label_names[example["label"]]
        return examples

    def uses_file_labels(self, labels: Any) -> bool:
        """Whether `labels` (a saved task's) are the data files' ids rather than the recipe's
        names: a prompt trained before the recipe named its labels (SST-2's ``["0", "1"]``)."""
        return bool(self.label_names) and labels is not None and set(labels) == set(self.label_names)

    def template_for(self, model_kind: Any = "encoder", head: str | None = None, deep: bool = False,
                     method: str | None = None) -> str:
        """The default template for a model kind and head.

        Args:
            model_kind: ``causal`` (answer read at the end), else ``encoder`` / ``seq2seq``
                (answer at ``[MASK]``); a `ModelKind` works too.
            head: the task head: ``verbalizer`` / ``lama`` (read the answer slot; the
                default), ``classification`` / ``ner`` (a head over the states: fields only).
            deep: a deep method (prefix tuning, P-tuning v2): no ``[P:n]`` slots.
            method: ``prompt-tuning`` and ``dept`` (prompt tuning's short prompt) get the
                manual template (their virtual tokens go in front).

        Returns:
            A template string for `softprompt.template.parse_template`.
        """
        kind = getattr(model_kind, "value", model_kind)
        style = "causal" if kind == "causal" else "masked"
        t = self.templates
        if self.task == "ner" or head in ("classification", "ner"):
            return t["plain"]
        if not deep and method not in ("prompt-tuning", "dept"):
            return t.get(f"p-tuning-{style}") or t["plain"]
        return t.get(style) or t["plain"]

    def candidates(self) -> list[str]:
        """LAMA: the shared candidate vocabulary (``common_vocab_cased.txt``) for precision@1."""
        if self.task != "lama":
            raise RecipeError(f"recipe {self.name!r} is not a LAMA recipe: it has labels, not candidates")
        return common_vocab(self.root)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (for run directories and reports)."""
        out = dataclasses.asdict(self)
        out["data_root"] = str(self.root)
        out["metrics"] = list(self.metrics)
        return out


# -- the data root ----------------------------------------------------------------------------
def data_root_candidates(data_root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Where data is looked for, in order: the argument, else ``$SOFTPROMPT_DATA``, else
    ``../shared/data`` from the current directory, else beside the repository."""
    if data_root is not None:
        return [("argument", Path(data_root).expanduser())]
    env = os.environ.get(ENV_VAR)
    if env:
        return [(f"${ENV_VAR}", Path(env).expanduser())]
    repo = Path(__file__).resolve().parents[3]  # src/softprompt/data/recipes.py -> the repository
    return [("../shared/data from the current directory", Path.cwd().parent / "shared" / "data"),
            ("../shared/data beside the repository", repo.parent / "shared" / "data")]


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root: the first existing candidate of `data_root_candidates` (an explicit
    argument or environment variable is used as given, existing or not)."""
    candidates = data_root_candidates(data_root)
    for _, path in candidates:
        if path.is_dir():
            return path.resolve()
    return candidates[0][1]


# -- the recipes ------------------------------------------------------------------------------
def _fewglue(task: str, **kwargs: Any) -> dict[str, Any]:
    return {"files": {"train": f"fewglue/{task}/train.jsonl", "dev": f"fewglue/{task}/dev32.jsonl",
                      "test": f"fewglue/{task}/val.jsonl"},
            "notes": f"FewGLUE {task} (THUDM/P-tuning @ f4225d4d, FewGLUE_32dev): train = train.jsonl (32 examples), "
                     "dev = dev32.jsonl (32, for model selection), test = val.jsonl (the official SuperGLUE "
                     "validation set, the P-tuning paper's test set).", **kwargs}


_PAIR = {  # premise / hypothesis pairs: GLUE RTE, FewGLUE RTE and CB
    "masked": "{premise} Question: {hypothesis} ? Answer: [MASK] .",
    "causal": "{premise} Question: {hypothesis} ? Answer: [MASK]",
    "p-tuning-masked": "{premise} [P:3] Question: {hypothesis} ? [P:3] Answer: [MASK] .",
    "p-tuning-causal": "{premise} [P:3] Question: {hypothesis} ? [P:3] Answer: [MASK]",
    "plain": "{premise} Question: {hypothesis} ?",
}
_GLUE_TEST = "GLUE test labels are hidden, so 'test' reads dev.tsv: the same {n} examples as 'dev' ({src})."

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(
        name="sst2", task="classification",
        files={"train": "sst2/train.tsv", "dev": "sst2/dev.tsv", "test": "sst2/dev.tsv"},
        templates={"masked": "{text} It was [MASK] .", "causal": "Review: {text} Sentiment: [MASK]",
                   "p-tuning-masked": "[P:3] {text} [P:3] It was [MASK] .",
                   "p-tuning-causal": "[P:3] Review: {text} [P:3] Sentiment: [MASK]", "plain": "{text}"},
        labels=["negative", "positive"], label_names={"0": "negative", "1": "positive"},
        label_words={"negative": ["terrible"], "positive": ["great"]},
        reader={"fields": {"sentence": "text"}},
        notes=_GLUE_TEST.format(n=872, src="GLUE SST-2, eyalbd2/Reproducing-AutoPrompt @ 6288fb5b")),
    Recipe(
        name="rte", task="classification",
        files={"train": "rte/train.tsv", "dev": "rte/dev.tsv", "test": "rte/dev.tsv"},
        templates=_PAIR, labels=["entailment", "not_entailment"],
        label_words={"entailment": ["Yes"], "not_entailment": ["No"]},
        reader={"fields": {"sentence1": "premise", "sentence2": "hypothesis", "index": "idx"}},
        notes=_GLUE_TEST.format(n=277, src="GLUE RTE, marcwww/nlu_eval @ ccd55c37")),
    Recipe(
        name="fewglue-rte", task="classification", templates=_PAIR, labels=["entailment", "not_entailment"],
        label_words={"entailment": ["Yes"], "not_entailment": ["No"]}, **_fewglue("RTE")),
    Recipe(
        name="fewglue-cb", task="classification", templates=_PAIR,
        labels=["entailment", "contradiction", "neutral"],
        label_words={"entailment": ["Yes"], "contradiction": ["No"], "neutral": ["Maybe"]},
        metrics=("accuracy", "macro_f1"), **_fewglue("CB")),
    Recipe(
        name="fewglue-boolq", task="classification",
        templates={"masked": "{passage} Question: {question} ? Answer: [MASK] .",
                   "causal": "{passage} Question: {question} ? Answer: [MASK]",
                   "p-tuning-masked": "{passage} [P:3] Question: {question} ? [P:3] Answer: [MASK] .",
                   "p-tuning-causal": "{passage} [P:3] Question: {question} ? [P:3] Answer: [MASK]",
                   "plain": "{passage} Question: {question} ?"},
        labels=["true", "false"], label_words={"true": ["Yes"], "false": ["No"]}, **_fewglue("BoolQ")),
    Recipe(
        name="fewglue-wic", task="classification",
        templates={
            "masked": '{sentence1} {sentence2} Question: is the word "{word}" used in the same sense in both '
                      "sentences ? Answer: [MASK] .",
            "causal": '{sentence1} {sentence2} Question: is the word "{word}" used in the same sense in both '
                      "sentences ? Answer: [MASK]",
            "p-tuning-masked": '{sentence1} [P:2] {sentence2} [P:2] Question: is the word "{word}" used in the '
                               "same sense in both sentences ? [P:2] Answer: [MASK] .",
            "p-tuning-causal": '{sentence1} [P:2] {sentence2} [P:2] Question: is the word "{word}" used in the '
                               "same sense in both sentences ? [P:2] Answer: [MASK]",
            "plain": "{sentence1} {sentence2} Word: {word}"},
        labels=["true", "false"], label_words={"true": ["Yes"], "false": ["No"]}, **_fewglue("WiC")),
    Recipe(
        name="wnut17", task="ner",
        files={"train": "wnut17/train.conll", "dev": "wnut17/dev.conll", "test": "wnut17/test.conll"},
        templates={"plain": "{tokens}"},
        labels=["O"] + [f"{p}-{e}" for e in ("corporation", "creative-work", "group", "location", "person", "product")
                        for p in "BI"],
        metric="f1", metrics=("f1", "precision", "recall"),
        notes="WNUT-17 emerging entities (davidsbatista/NER-datasets @ db7ff3ca): train = wnut17train.conll, "
              "dev = emerging.dev.conll, test = emerging.test.annotated; entity-level F1 (seqeval). Byte-order "
              "marks in dev.conll (inside a token and as its last line) are removed."),
    Recipe(
        name="lama-trex", task="lama",
        templates={"p-tuning-masked": "[P:3] {X} [P:3] [MASK] [P:3]", "p-tuning-causal": "[P:3] {X} [P:3] [MASK]",
                   "plain": "{X} [MASK]"},
        metric="precision_at_1", metrics=("precision_at_1",),
        notes="LAMA T-REx (yanaiela/pararel @ cb555467, trex_lms_vocab: 41 relations, 29,411 facts). No official "
              "split: each relation's facts are split 60/20/20 into train/dev/test in the order of "
              "SHA-256(seed, relation, subject, object), seed 0 -- stable across runs, machines and Python "
              "versions; repeated (subject, object) facts stay in one split. LAMA's manual template "
              "(ncarraz/OptiPrompt @ f88fbb30) is in each example's 'manual_template' ([X] / [Y] syntax; "
              "softprompt.data.lama_template converts it). All facts are kept (common_vocab_only=False); 25,245 "
              "have their object in common_vocab_cased.txt."),
]}


def load_recipe(name: str, data_root: str | os.PathLike | None = None) -> Recipe:
    """A built-in recipe, bound to a data root and checked for its files.

    Args:
        name: a key of `RECIPES`; ``lama-trex:P19`` selects one LAMA relation.
        data_root: default: ``$SOFTPROMPT_DATA``, else ``../shared/data`` (see `resolve_data_root`).

    Raises:
        RecipeError: an unknown name (lists the known ones, suggests the closest), an
            unknown relation, or missing data files (lists the paths looked for).
    """
    base, sep, arg = str(name).partition(":")
    if base not in RECIPES:
        close = difflib.get_close_matches(base, list(RECIPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown recipe {name!r}{hint} (known: {', '.join(RECIPES)}, lama-trex:<relation>; "
                          "or a generic task: classification, ner, generation with --train/--eval files)")
    recipe = dataclasses.replace(RECIPES[base], data_root=resolve_data_root(data_root))
    if sep:
        if recipe.task != "lama":
            raise RecipeError(f"recipe {base!r} takes no ':{arg}' argument (only lama-trex:<relation> does)")
        recipe = _one_relation(recipe, arg.strip().upper())
    return recipe.check()


def _one_relation(recipe: Recipe, relation: str) -> Recipe:
    known = lama_relations(recipe.root)
    if not known:
        recipe.check()  # reports the missing files
    if relation not in known:
        close = difflib.get_close_matches(relation, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"no LAMA relation {relation!r} under {recipe.root / 'lama' / 'trex'}{hint} "
                          f"(known: {', '.join(known)})")
    one = dataclasses.replace(recipe, name=f"{recipe.name}:{relation}", relation=relation)
    one.check()
    manual = read_relation_templates(one.root)[relation]
    templates = dict(recipe.templates, masked=lama_template(manual), causal=lama_template(manual, causal=True))
    return dataclasses.replace(one, templates=templates)


__all__ = [
    "ENV_VAR",
    "RECIPES",
    "SPLITS",
    "Recipe",
    "RecipeError",
    "data_root_candidates",
    "load_recipe",
    "resolve_data_root",
]
