"""Template sets: every phrasing of the library renders every row, phrasings are chosen per example
(seeded or in turn), fields map to the data's columns, and what cannot render is an error naming the set."""
import json

import datasets
import pytest

from jpeft.config import load_config
from jpeft.data import render, template_columns, tokenize_supervised
from jpeft.data.prepare import prepare_rows
from jpeft.data.templates import available, load_template_set
from jpeft.errors import ConfigError, DataError
from conftest import dialogsum_rows

# One row holding every field any set of the library reads, with braces and newlines in the values.
FIXTURE = [{"text": "A said hi.\nB said {bye}.", "summary": "They greet.", "context": "Paris is in France.",
            "question": "Where is Paris?", "answer": "France", "options": "positive, negative", "label": "positive",
            "source_language": "English", "target_language": "German", "source": "Good morning.",
            "target": "Guten Morgen.", "instruction": "Name a colour.", "input": "", "output": "Blue"},
           {"text": "x", "summary": "y", "context": "c", "question": "q?", "answer": "a", "options": "o", "label": "l",
            "source_language": "French", "target_language": "English", "source": "Bonjour.", "target": "Hello.",
            "instruction": "i", "input": "in", "output": "out"}]


def test_the_library_has_each_task_with_several_phrasings():
    assert {"summarization", "qa", "classification", "translation", "instruction"} <= set(available())
    for name in available():
        ts = load_template_set(name)  # declared fields must equal what the phrasings read (checked on load)
        assert len(ts.phrasings) >= 4 and ts.description, name
        assert len({p for p, _ in ts.phrasings}) == len(ts.phrasings), name


@pytest.mark.parametrize("name", available())
def test_every_phrasing_renders_every_row(name):
    ts = load_template_set(name)
    for prompt, target in ts.phrasings:
        assert set(template_columns(prompt)) - set(template_columns(target)), (name, prompt)  # the prompt has input
        for row in FIXTURE:
            text = render(prompt, row)
            assert all(row[c] in text for c in template_columns(prompt))
            assert "{" not in text.replace(row["text"], "")  # no placeholder left unfilled
            assert render(target, row) in {row[c] for c in ts.columns()}  # a target reads one field as it is


def test_random_choice_is_seeded_and_uses_every_phrasing_cycle_takes_turns():
    ts = load_template_set("summarization")
    n, k = 600, len(ts.phrasings)
    first, again, other = ts.choose(n, "random", 0), ts.choose(n, "random", 0), ts.choose(n, "random", 1)
    assert first == again and first != other
    counts = [first.count(i) for i in range(k)]
    assert min(counts) > n / k / 2  # roughly uniform, none left out
    assert ts.choose(2 * k + 1, "cycle") == [i % k for i in range(2 * k + 1)]


def test_columns_map_fields_to_the_datas_own_names():
    ts = load_template_set("summarization").renamed({"text": "dialogue"})
    row = dialogsum_rows(1)[0]
    assert ts.columns() == ["dialogue", "summary"]
    for (prompt, target), (original, _) in zip(ts.phrasings, load_template_set("summarization").phrasings):
        assert render(prompt, row) == render(original, {"text": row["dialogue"], "summary": row["summary"]})
        assert render(target, row) == row["summary"]
    with pytest.raises(ConfigError, match="data.columns maps dialog, which template 'summarization'"):
        load_template_set("summarization").renamed({"dialog": "dialogue"})


def test_an_own_set_may_name_any_column_with_literal_braces_and_indexing(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("templates:\n  - prompt: \"{{json}} {translation[en]} -> \"\n    target: \"{translation[de]}\"\n")
    ts = load_template_set(str(path))
    assert ts.columns() == ["translation"]
    row = {"translation": {"en": "Hi", "de": "Hallo"}}
    assert render(ts.phrasings[0][0], row) == "{json} Hi -> "
    renamed = ts.renamed({"translation": "pair"})
    assert render(renamed.phrasings[0][0], {"pair": row["translation"]}) == "{json} Hi -> "
    assert render(renamed.phrasings[0][1], {"pair": row["translation"]}) == "Hallo"


def test_bad_sets_and_names_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such template set; the library has .*summarization"):
        load_template_set("summarisation")
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates:\n  - prompt: '{a}'\n")
    with pytest.raises(ConfigError, match="phrasing 1 must have exactly a prompt and a target"):
        load_template_set(str(bad))
    bad.write_text("fields: [a]\ntemplates:\n  - {prompt: '{a} {b}', target: '{c}'}\n")
    with pytest.raises(ConfigError, match=r"declares fields \['a'\] but its phrasings read \['a', 'b', 'c'\]"):
        load_template_set(str(bad))


def test_a_column_the_data_lacks_is_an_error_naming_the_set(tokenizer):
    data = load_config(None, ["data.train=x.jsonl", "data.template=summarization"]).data
    rows = datasets.Dataset.from_list([{"dialogue": "a cat sat", "summary": "cat"}])
    with pytest.raises(DataError, match=r"template set 'summarization' \(.*summarization.yaml\) reads column\(s\) "
                                        r"text, which data file 'x.jsonl' lacks.*data.columns, e.g. \{text: <column>\}"):
        prepare_rows(data, rows, "x.jsonl", tokenizer, 32)


def test_rows_are_tokenized_with_their_own_phrasing(tokenizer):
    """A set's per-row phrasings give exactly the examples of rendering each row's phrasing by hand."""
    data = load_config(None, ["data.train=x.jsonl", "data.template=summarization", "data.columns={text: dialogue}",
                              "data.template_mode=cycle", "data.packing=false"]).data
    rows = datasets.Dataset.from_list([{"dialogue": "hello world", "summary": "dog ran"},
                                       {"dialogue": "a cat sat on mat", "summary": "cat sat"},
                                       {"dialogue": "we go out", "summary": "sunny today"}])
    prepared = prepare_rows(data, rows, "x.jsonl", tokenizer, 48, seed=3)
    ts = load_template_set("summarization").renamed({"text": "dialogue"})
    for i, row in enumerate(rows):
        prompt, target = ts.phrasings[i % len(ts.phrasings)]
        alone = tokenize_supervised([row], tokenizer, prompt, target, 48)
        for name, array in alone.arrays().items():
            assert (getattr(prepared.examples, name)[i] == array[0]).all(), (i, name)


def test_config_checks(tmp_path):
    base = ["data.train=x.jsonl"]
    assert load_config(None, base + ["data.template=qa"]).data.template_mode == "random"
    with pytest.raises(ConfigError, match="data.template.*conflicts with data.prompt/data.target"):
        load_config(None, base + ["data.template=qa", "data.prompt={a}", "data.target=b"])
    with pytest.raises(ConfigError, match="data.columns.*set data.template too"):
        load_config(None, base + ["data.prompt={a}", "data.target=b", "data.columns={a: b}"])
    with pytest.raises(ConfigError, match="data.template.*conflicts with data.label"):
        load_config(None, base + ["data.template=qa", "data.label=y", "data.text=x", "method.name=classifier"])
    with pytest.raises(ConfigError, match="data.template_mode.*must be one of random, cycle"):
        load_config(None, base + ["data.template=qa", "data.template_mode=shuffle"])
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": {"train": "x.jsonl", "template": "summarization",
                                           "columns": {"text": "dialogue"}}}))
    assert load_config(str(config)).data.columns == {"text": "dialogue"}
